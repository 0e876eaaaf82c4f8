"""resume.py - checkpoints that resume a training run exactly, and never trust the file.

What you will learn
  * what a run's state is: the weights, the optimizer's moments, the fp16 loss scale, every
    random generator of every process (Python, NumPy, torch, CUDA) and the data position;
    save all of it and a resumed run is bit-for-bit the run that never stopped;
  * that a run checkpoint is a model checkpoint (gpt.py's one layout: format, config, model)
    with those extras, so gpt.py, train.py and finetune.py read each other's files;
  * reading a file you did not write: weights_only=True (no code), then every field checked
    against what this run builds itself (types, keys, lengths, shapes), one line naming the
    file and the field when something does not fit.

Run it
  python resume.py           # a tiny run straight, then saved at step stop_at, "killed" and
                             # resumed: the same weights bit for bit; then what each missing
                             # piece (optimizer moments, RNG) costs. A few seconds.
train.py uses it (save_run after a step, resume before the loop); test_all.py checks an
interrupted and resumed train.py run against one that never stopped.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import contextlib
import dataclasses
import glob
import math
import os
import random
import re

import numpy as np
import torch

import corpora
import gpt
import optim  # its NS_STEPS, named in the range a resumed Muon state must have

# demo hyperparameters (python resume.py --name=value)
steps = 20               # steps of the tiny run
stop_at = 10             # the step where the run is saved and "killed"
dropout = 0.1            # > 0: the forward pass draws random numbers, so the RNG state matters
seed = 1337
out_dir = "out/resume"   # the demo's checkpoints


# ----------------------------------------------------------------------------- save and read
# A run's checkpoint is a model checkpoint in gpt.py's one layout (format, config, model),
# whose extras are what an exact resume needs: the step, the optimizer, the fp16 scaler,
# every process's RNGs, the data position (plus train_config and the tokenizer's path).
RUN_KEYS = ("step", "optimizer", "scaler", "rng", "data")


def checkpoints(out_dir):
    """The checkpoint files in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def save_run(out_dir, step, model, keep=3, **extras):
    """Write out_dir/ckpt_STEP.pt with gpt.save_checkpoint (atomic; refuses non-finite weights),
    then delete all but the newest `keep`."""
    path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    gpt.save_checkpoint(path, model, step=step, **extras)
    for old in checkpoints(out_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(old)
    return path


def load_run(path):
    """A run checkpoint, read by gpt.read_checkpoint (the one reader: format, config, weights),
    with the resume fields checked too: one ValueError naming the file and the field. The
    optimizer, scaler and data position are checked against the live objects (resume)."""
    ck = gpt.read_checkpoint(path, RUN_KEYS)
    if type(ck["step"]) is not int or ck["step"] < 0:
        raise ValueError(f"{path}: step={ck['step']!r} is not a step number")
    for key in ("optimizer", "scaler", "data"):
        if not isinstance(ck[key], dict):
            raise ValueError(f"{path}: {key} is {short(ck[key])}, expected a dict")
    rngs, live = ck["rng"], rng_state()
    if not isinstance(rngs, list) or not rngs:
        raise ValueError(f"{path}: rng is {short(rngs)}, expected a list of generator states")
    for i, r in enumerate(rngs):  # CUDA generators: as many as that machine had GPUs
        cuda = r.get("cuda") if isinstance(r, dict) else None
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) for t in cuda):
            raise ValueError(f"{path}: rng[{i}] is not a generator state")
        check_like(path, f"rng[{i}]", dict(r, cuda=[]), dict(live, cuda=[]))
    return ck


def check_like(path, name, saved, live):
    """Refuse a saved value not built like the one this run makes itself (the same types, dict
    keys, sequence lengths, tensor dtypes and shapes): one ValueError naming file and field."""
    if isinstance(live, dict):
        ok = isinstance(saved, dict) and saved.keys() == live.keys()
    elif isinstance(live, (list, tuple)):
        ok = type(saved) is type(live) and len(saved) == len(live)
    elif isinstance(live, torch.Tensor):
        ok = (isinstance(saved, torch.Tensor) and saved.dtype == live.dtype
              and saved.shape == live.shape)
    else:  # an int where a float is (weight_decay=0 from Python) is a number all the same
        ok = type(saved) is type(live) or {type(saved), type(live)} == {int, float}
    if not ok:
        raise ValueError(f"{path}: {name} is {short(saved)}, expected {short(live)}")
    inner = (live.items() if isinstance(live, dict) else
             enumerate(live) if isinstance(live, (list, tuple)) else ())
    for k, v in inner:
        check_like(path, f"{name}.{k}" if isinstance(live, dict) else f"{name}[{k}]", saved[k], v)


def short(value):
    """A few words for a value in an error message."""
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:6]}"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _finite(lo, hi=math.inf):
    return lambda v: isinstance(v, (int, float)) and lo <= v < hi


GROUP_RANGES = {  # what an optimizer group read from a file may say: (in words, test)
    "lr": ("finite and >= 0", _finite(0)), "weight_decay": ("finite and >= 0", _finite(0)),
    "eps": ("finite and >= 0", _finite(0)), "momentum": ("in [0, 1)", _finite(0, 1)),
    "lr_scale": ("finite and >= 0", _finite(0)),
    "betas": ("two numbers in [0, 1)", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
              and all(_finite(0, 1)(b) for b in v)),
    "ns_steps": (f"an integer in [1, 100] (optim.NS_STEPS is {optim.NS_STEPS})",
                 lambda v: type(v) is int and 1 <= v <= 100),
    "ns_dtype": ("bfloat16, float16, float32 or float64",
                 lambda v: v in ("bfloat16", "float16", "float32", "float64")),
}


def load_optimizer(path, opt, saved):
    """opt.load_state_dict(saved), refusing a state that does not fit these parameters (group
    sizes, hyperparameter types, moment shapes) with one line naming the file."""
    live = opt.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if (not isinstance(saved.get("state"), dict) or not isinstance(groups, list)
            or len(groups) != len(live) or not all(isinstance(g, dict) for g in groups)):
        raise ValueError(f"{path}: optimizer is not an optimizer state for this model")
    for i, (g, h) in enumerate(zip(groups, live)):
        for k in g.keys() & h.keys():  # ours and torch's AdamW share most names
            check_like(path, f"optimizer.param_groups[{i}].{k}", g[k], h[k])
            ok = GROUP_RANGES.get(k, (None, lambda v: True))
            if not ok[1](g[k]):  # the same ranges the command line has: ns_steps=10**12 ran forever
                raise ValueError(f"{path}: optimizer.param_groups[{i}].{k}={short(g[k])} must be {ok[0]}")
    try:
        opt.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: optimizer state does not fit ({str(e)[:120]})") from None
    for p, state in opt.state.items():
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or v.dim() and v.shape != p.shape:
                raise ValueError(f"{path}: optimizer state {k} is {short(v)}, expected a tensor "
                                 f"of shape {tuple(p.shape)}")


def clean_state_dict(sd):
    """Plain parameter names: torch.compile adds '_orig_mod.', DDP adds 'module.'."""
    return {re.sub(r"^(module\.)+", "", k.replace("_orig_mod.", "")): v for k, v in sd.items()}


def config_diff(saved, current, ignore=("dropout", "kernels")):
    """'name saved -> current' for each model-config field that differs (dropout and the
    kernels may change: they change how the same weights are computed, not the weights).
    A field the checkpoint predates counts as its default (a newer option, off)."""
    default = dataclasses.asdict(gpt.GPTConfig())
    saved = {**{k: v for k, v in default.items() if k not in saved}, **saved}
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in ignore and saved.get(k) != current.get(k)]


# ----------------------------------------------------------------------------- resume
def resume(c, mcfg, raw, opt, scaler, loader, rank, world):
    """Load the checkpoint --init names (auto: the newest in out_dir) into the run's pieces:
    (step, newest checkpoint in out_dir, the path resumed from or None)."""
    ckpts = checkpoints(c.out_dir)
    if c.init == "scratch" and ckpts:
        raise ValueError(f"{c.out_dir} already holds {os.path.basename(ckpts[-1])}; "
                         "--init=scratch will not overwrite it: pick another --out_dir")
    last = ckpts[-1] if ckpts else None
    path = {"auto": last, "scratch": None}.get(c.init, c.init)
    if not path:
        return 0, last, None
    ck = load_run(path)
    diff = config_diff(ck["config"], dataclasses.asdict(mcfg))
    if diff:
        raise ValueError(f"{path} holds a different model ({'; '.join(diff)}); use the same "
                         "model settings, or another --out_dir for a new run")
    gpt.load_weights_from(raw, path, {"model": clean_state_dict(ck["model"])})
    load_optimizer(path, opt, ck["optimizer"])
    if scaler.is_enabled():  # a run that was fp16 and is not now keeps no scale
        check_like(path, "scaler", ck["scaler"], scaler.state_dict())
        scaler.load_state_dict(ck["scaler"])
    check_like(path, "data", ck["data"], loader.state_dict())
    if not 0 <= ck["data"]["pos"] < 2**62:  # the windows handed out: 2**70 overflowed numpy
        raise ValueError(f"{path}: data.pos={ck['data']['pos']} must be in [0, 2**62)")
    loader.load_state_dict(ck["data"])  # a global position: any world size resumes
    if len(ck["rng"]) == world:  # else (another world size) the RNGs keep their seeds
        try:
            set_rng_state(ck["rng"][rank])
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError, OverflowError) as e:
            raise ValueError(f"{path}: rng[{rank}] is not a generator state ({str(e)[:100]})") from None
    return ck["step"], last, path


# ----------------------------------------------------------------------------- RNG state
def rng_state():
    """Every random generator a run uses, as tensors and plain lists (weights_only-safe)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [key.tolist(), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    """Put back rng_state()'s generators; a state out of range is a ValueError (or TypeError)."""
    random.setstate(s["python"])
    key, pos, has_gauss, gauss = s["numpy"]
    if not (len(key) == 624 and all(type(k) is int and 0 <= k < 2**32 for k in key) and type(pos) is int
            and 0 <= pos <= 624 and has_gauss in (0, 1)):  # MT19937: 624 words and an index
        raise ValueError("numpy: not an MT19937 state (624 keys in [0, 2**32), a position in [0, 624])")
    if not isinstance(s["torch"], torch.Tensor) or s["torch"].dtype != torch.uint8 \
            or s["torch"].shape != torch.get_rng_state().shape or not s["torch"].any():
        raise ValueError("torch: not a CPU generator state (a zeroed or resized one)")
    np.random.set_state(("MT19937", np.array(key, np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- demo
def demo_run(data, first, last, path=None, keep=("weights", "optimizer", "rng")):
    """Train a tiny GPT on the plays' bytes from step `first` to `last`: from scratch, or from
    the checkpoint at path restoring only the pieces named in keep. data: the text's bytes as
    a tensor. Batches are drawn with torch's RNG (so is dropout): the position in the data is
    the RNG's (train.py's loader saves its own, data.pos). Returns (model, last loss)."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256,
                                  pad_vocab=1, dropout=dropout))
    opt = optim.AdamW(model.parameters(), lr=3e-3)
    if path:
        ck = load_run(path)
        gpt.load_weights_from(model, path, ck) if "weights" in keep else None
        load_optimizer(path, opt, ck["optimizer"]) if "optimizer" in keep else None
        set_rng_state(ck["rng"][0]) if "rng" in keep else None
    for step in range(first, last):
        i = torch.randint(len(data) - 33, (8,))
        x, y = (torch.stack([data[j + k:j + k + 32] for j in i]) for k in (0, 1))
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == stop_at and not path:
            save_run(out_dir, step + 1, model, optimizer=opt.state_dict(), scaler={},
                     rng=[rng_state()], data={"pos": 0})
    return model, loss.item()


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                          b.state_dict().values()))


def main():
    cli.check(globals(), [("steps", steps >= 2, "at least 2"),
                          ("stop_at", 1 <= stop_at < steps, f"in [1, --steps={steps})"),
                          ("dropout", 0 <= dropout < 1, "in [0, 1)"), ("seed", seed >= 0, ">= 0"),
                          ("out_dir", out_dir != "", "a folder")])
    with cli.hold_dir(out_dir):
        for old in checkpoints(out_dir):
            os.remove(old)  # this demo's own files from an earlier run
        data = torch.tensor(list(corpora.load_plays()[0].encode()))  # the first play's bytes
        straight, loss = demo_run(data, 0, steps)
        path = checkpoints(out_dir)[-1]
        print(f"straight run: {steps} steps, last loss {loss:.4f}; saved {path} at step {stop_at}")
        for keep, what in ((("weights", "optimizer", "rng"), "weights + optimizer + RNG"),
                           (("weights", "rng"), "weights + RNG, fresh optimizer"),
                           (("weights", "optimizer"), "weights + optimizer, fresh RNG")):
            resumed, loss = demo_run(data, stop_at, steps, path, keep)
            d = max_diff(straight, resumed)
            verdict = "bit for bit the straight run" if d == 0 else f"max |weight diff| {d:.2e}"
            print(f"killed at {stop_at}, resumed with {what:<32}: last loss {loss:.4f}, {verdict}")


if __name__ == "__main__":
    cli.run(main, globals())
