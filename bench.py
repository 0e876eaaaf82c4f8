"""bench.py - every speed number in the README, measured against its reference in the same run.

Each section times our code and the reference library in the same process, taking turns
(cuda_primer.timed: medians of --repeat rounds), and reports the ratio, so numbers from different
machines compare by ratio only. This machine class (2 shared cores) is noisy: rerun, and read
the ratios.

    python bench.py                                   # every section (about 15 minutes)
    python bench.py --only=micrograd,bpe --repeat=5
    python bench.py --only=model --device=cuda        # on a GPU
    python bench.py --only=train --data=../shared/data
    python bench.py --only=ablation --data=../shared/data --repeat=1   # docs/speedrun.md
    python bench.py --only=step --data=../shared/data --repeat=6       # one step, by part
    python bench.py --only=mfu --device=cuda --variants=0,3   # rows of MFU_VARIANTS
    python bench.py --only=prepare --corpus_mb=1024   # corpus -> shards vs build-nanogpt's method
    python bench.py --only=kernels --device=cuda      # Triton kernels vs SDPA, eager, compile

Sections: micrograd (vs PyPI micrograd, torch), bpe (vs HF tokenizers, tiktoken), data (loader vs
training), prepare (corpus to shards vs build-nanogpt's tiktoken pool), model (vs transformers' GPT-2), primer (bandwidth, matmul, fusion, kernels), train
(shakespeare-char: nanoGPT's baseline config vs our presets; the 16 GB fit), ablation (each
speedrun idea alone on top of shakespeare-char), step (one training step by part: data,
forward, backward, clip, optimizer; baseline vs speedrun before and now), mfu (the 124M
training micro-step on a GPU, variant by variant, vs transformers'), evals (HellaSwag
scoring vs transformers), kernels (kernels.py's Triton FlashAttention-2, norms and loss vs SDPA
/ eager / torch.compile, and the 124M step with and without them; GPU only). Rows also go to
out/bench.json.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import contextlib
import importlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # our micrograd.py must win over the PyPI `micrograd` package

import numpy as np  # noqa: E402
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import bpe  # noqa: E402
import corpora  # noqa: E402
import cuda_primer as cp  # noqa: E402
import dataloader as dl  # noqa: E402
import gpt  # noqa: E402
import micrograd as mg  # noqa: E402
import train  # noqa: E402
from bpe import GPT2_PATTERN, Tokenizer  # noqa: E402
from train import device_peak  # noqa: E402

# python bench.py --name=value
only = "all"          # comma-separated sections, or "all"
data = ""             # folder with tinyshakespeare.txt, gpt2_vocab.json, gpt2_merges.txt
repeat = 5            # timed runs per number (the median is reported)
device = "cpu"        # model and mfu sections: "cuda" on a GPU
variants = ""         # mfu section: indices into MFU_VARIANTS, e.g. "0,3,4" ("" = all)
corpus_mb = 1024      # prepare section: MB of generated text (>= 1024 for the README row)
out = "out/bench.json"

# ======================================================================
# micrograd: the Value engine vs PyPI micrograd, the Tensor engine vs torch
# ======================================================================

assert Path(mg.__file__).resolve() == ROOT / "micrograd.py", f"wrong micrograd imported: {mg.__file__}"


def load_pypi_micrograd():
    """(engine, nn) modules of the PyPI micrograd package, loaded without shadowing ours."""
    root = Path(metadata.distribution("micrograd").locate_file("micrograd"))
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "micrograd"}
    try:
        spec = util.spec_from_file_location("micrograd", root / "__init__.py", submodule_search_locations=[str(root)])
        sys.modules["micrograd"] = util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["micrograd"])
        engine = importlib.import_module("micrograd.engine")
        nn = importlib.import_module("micrograd.nn")  # its `from micrograd.engine import Value` finds PyPI's
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "micrograd"]:
            del sys.modules[k]
        sys.modules.update(ours)
    assert nn.Value is engine.Value and engine.Value is not mg.Value
    return engine, nn


# ----------------------------------------------------------------------------- (a), (b): moons

def sgd_steps(model, loss_fn, steps):
    """Karpathy's demo loop: full batch, lr 1.0 decayed linearly to 0.1. Returns the losses."""
    losses = []
    for k in range(steps):
        loss = loss_fn()
        model.zero_grad()
        loss.backward()
        lr = 1.0 - 0.9 * k / steps
        for p in model.parameters():
            p.data -= lr * p.grad
        losses.append(loss.data)
    return losses


def pypi_loss(model, Value, X, y, alpha=1e-4):
    """The max-margin loss as PyPI micrograd's demo writes it."""
    inputs = [list(map(Value, x)) for x in X]
    scores = list(map(model, inputs))
    losses = [(1 + -yi * s).relu() for yi, s in zip(y, scores)]
    return sum(losses) * (1.0 / len(losses)) + alpha * sum(p * p for p in model.parameters())


def same_graph_forward(model, x):
    """Our MLP evaluated with binary ops only: exactly the graph PyPI's MLP builds."""
    x = [mg.Value(v) for v in x]
    for layer in model.layers:
        x = [(lambda a: a.relu() if n.nonlin else a)(sum((w * xi for w, xi in zip(n.w, x)), n.b))
             for n in layer.neurons]
    return x[0]


def tensor_moons(weights, X, y, steps, alpha=1e-4):
    """The same training on the Tensor engine: weights as (in, out) matrices, all points at once."""
    params = [mg.Tensor(w.copy()) for w in weights]  # Tensor wraps arrays without copying
    Xt, yt = mg.Tensor(X, requires_grad=False), mg.Tensor(y, requires_grad=False)
    losses = []
    for k in range(steps):
        h = (Xt @ params[0] + params[1]).relu()
        h = (h @ params[2] + params[3]).relu()
        scores = (h @ params[4] + params[5]).reshape(-1)
        loss = (1 - yt * scores).relu().mean() + alpha * sum((p * p).sum() for p in params)
        for p in params:
            p.grad = None
        loss.backward()
        lr = 1.0 - 0.9 * k / steps
        for p in params:
            p.data -= lr * p.grad
        losses.append(loss.item())
    return losses


def as_matrices(model):
    """An MLP's Values as [W1, b1, W2, b2, ...] with W (in, out): column j is neuron j."""
    out = []
    for layer in model.layers:
        out.append(np.array([[n.w[i].data for n in layer.neurons] for i in range(len(layer.neurons[0].w))]))
        out.append(np.array([n.b.data for n in layer.neurons]))
    return out


def bench_moons(repeat, steps=100):
    engine, nn = load_pypi_micrograd()
    X, y = mg.make_moons(100, 0.1, seed=0)
    Xl, yl = X.tolist(), y.tolist()
    random.seed(1337)
    ours = mg.MLP(2, [16, 16, 1])
    init = [p.data for p in ours.parameters()]
    theirs = nn.MLP(2, [16, 16, 1])

    def reset():
        for m in (ours, theirs):
            for p, v in zip(m.parameters(), init):
                p.data = v

    def run_theirs(n=steps):
        reset()
        return sgd_steps(theirs, lambda: pypi_loss(theirs, engine.Value, Xl, yl), n)

    def run_ours(n=steps):
        reset()
        return sgd_steps(ours, lambda: mg.hinge_loss(ours, X, y)[0], n)

    def same_graph_loss():
        scores = [same_graph_forward(ours, x) for x in Xl]
        losses = [(1 + -yi * s).relu() for yi, s in zip(yl, scores)]
        return sum(losses) * (1.0 / len(losses)) + 1e-4 * sum(p * p for p in ours.parameters())

    def run_same_graph(n=steps):
        reset()
        return sgd_steps(ours, same_graph_loss, n)

    mats = as_matrices(ours)
    (t_theirs, t_ours, t_same, t_tensor), (l_theirs, l_ours, l_same, l_tensor) = cp.timed(
        [run_theirs, run_ours, run_same_graph, lambda: tensor_moons(mats, X, y, steps)], repeat)
    diff = max(abs(a - b) for a, b in zip(l_ours, l_theirs))
    diff_same = max(abs(a - b) for a, b in zip(l_same, l_theirs))
    diff_tensor = max(abs(a - b) for a, b in zip(l_tensor, l_ours))
    assert len(l_ours) == len(l_theirs) == len(l_tensor) == steps
    assert max(diff, diff_same, diff_tensor) <= 1e-9, (diff, diff_same, diff_tensor)
    # with Python's garbage collector on (the default), a few steps only: PyPI gets very slow
    (t_theirs_gc, t_ours_gc), _ = cp.timed([lambda: run_theirs(5), lambda: run_ours(5)], repeat, gc_on=True)
    row = lambda name, ref, t_ref, t, check: dict(
        section="micrograd", name=name, reference=ref, reference_s=round(t_ref, 4), ours_s=round(t, 4),
        speedup=round(t_ref / t, 2), check=check)
    return [
        row(f"Value engine, {steps} SGD steps MLP(2,[16,16,1]) hinge, 100 moons", "PyPI micrograd 0.1.0",
            t_theirs, t_ours, f"losses agree, max |diff| {diff:.1e}"),
        row("  same graph as PyPI (binary ops only, no fused dot/sum)", "PyPI micrograd 0.1.0",
            t_theirs, t_same, f"losses agree, max |diff| {diff_same:.1e}"),
        row("  5 steps with the garbage collector on (Python default)", "PyPI micrograd 0.1.0",
            t_theirs_gc, t_ours_gc, "-"),
        row(f"Tensor engine, same {steps} steps (all points in one batch)", "our Value engine",
            t_ours, t_tensor, f"losses agree, max |diff| {diff_tensor:.1e}"),
    ]


# ----------------------------------------------------------------------------- (c): vs torch

def bench_torch_mlp(repeat, batch=64, width=256, n_classes=10, iters=20):
    """x (64, 256) -> Linear 256 -> GELU -> Linear 256 -> GELU -> Linear 10 -> cross-entropy."""
    rng = np.random.default_rng(0)
    sizes = [width, width, width, n_classes]
    ws = [(rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32) for i, o in zip(sizes, sizes[1:])]
    bs = [np.zeros(o, np.float32) for o in sizes[1:]]
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.integers(0, n_classes, batch)

    params = [mg.Tensor(a) for pair in zip(ws, bs) for a in pair]
    xt = mg.Tensor(x, requires_grad=False)
    tparams = [torch.tensor(a, requires_grad=True) for pair in zip(ws, bs) for a in pair]
    xtt, ttt = torch.tensor(x), torch.tensor(t)

    def ours():
        h = xt
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            h = h.gelu("tanh") if i < len(params) - 2 else h
        loss = mg.cross_entropy(h, t)
        for p in params:
            p.grad = None
        loss.backward()
        return loss.item()

    def ref():
        h = xtt
        for i in range(0, len(tparams), 2):
            h = h @ tparams[i] + tparams[i + 1]
            h = torch.nn.functional.gelu(h, approximate="tanh") if i < len(tparams) - 2 else h
        loss = torch.nn.functional.cross_entropy(h, ttt)
        for p in tparams:
            p.grad = None
        loss.backward()
        return loss.item()

    lo, lr_ = ours(), ref()
    gdiff = max(float(np.abs(p.grad - tp.grad.numpy()).max()) for p, tp in zip(params, tparams))
    assert abs(lo - lr_) < 1e-5 and gdiff < 1e-5, (lo, lr_, gdiff)
    loop = lambda f: (lambda: [f() for _ in range(iters)])
    (t_ours, t_ref), _ = cp.timed([loop(ours), loop(ref)], 5 * repeat)  # short rounds: many of them
    return [dict(section="micrograd",
                 name=f"Tensor engine MLP fwd+bwd, batch {batch}, width {width}, float32 (per step)",
                 reference=f"torch {torch.__version__} CPU ({torch.get_num_threads()} threads)",
                 reference_s=round(t_ref / iters, 6), ours_s=round(t_ours / iters, 6),
                 speedup=round(t_ref / t_ours, 2), check=f"loss and grads agree, max |diff| {gdiff:.1e}")]


def bench_micrograd(args):
    repeat = max(1, getattr(args, "repeat", None) or 3)
    rows = bench_moons(repeat) + bench_torch_mlp(repeat)
    print(f"{'benchmark':<72} {'reference':<28} {'ref s':>9} {'ours s':>9} {'speedup':>8}  check")
    for r in rows:
        print(f"{r['name']:<72} {r['reference']:<28} {r['reference_s']:>9.4g} {r['ours_s']:>9.4g} "
              f"{r['speedup']:>7.2f}x  {r['check']}")
    return rows


# ======================================================================
# bpe: training vs HF tokenizers, encoding vs tiktoken (text, and one long pre-token), encode_iterable memory
# ======================================================================



def hf_train(docs, vocab_size):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok


MEMORY_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    import bpe

    def status(field):  # resident memory, MiB, from Linux's /proc (ru_maxrss would count the parent)
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    tok = bpe.Tokenizer.load(sys.argv[1])
    tok.encode_ordinary("warm up the regex")
    base = status("VmRSS")
    t0, n = time.perf_counter(), 0
    with open(sys.argv[2], encoding="utf-8", newline="") as f:
        for _ in tok.encode_iterable(f):
            n += 1
    print(base, status("VmHWM"), n, time.perf_counter() - t0)
""")


def unspaced_text(n, seed=0):
    """n characters with no space: runs of letters, of CJK and of base64, up to 20k characters each."""
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 "".join(map(chr, range(0x4E00, 0x9FA6))),
                 "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"]
    parts, size = [], 0
    while size < n:
        s = "".join(rng.choices(rng.choice(alphabets), k=rng.randrange(1, 20_000)))
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n]


def bench_bpe_long(tok, enc, vocab_name, repeat, n=1_000_000):
    """Encoding one long pre-token is O(n log n) with bpe_heap (the pair-list loop was quadratic):
    n characters vs tiktoken, and the time ratio when the length doubles."""
    texts = {n: unspaced_text(n), 2 * n: unspaced_text(2 * n)}
    times = {}
    for k, text in texts.items():
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
        (tik, ours), _ = cp.timed([lambda: enc.encode_ordinary(text),
                                   lambda: (tok.cache.clear(), tok.encode_ordinary(text))], repeat, gc_on=True)
        times[k] = ours, tik
    (ours, tik), (ours2, tik2) = times[n], times[2 * n]
    longest = max(map(len, tok.regex.findall(texts[n])))
    return [
        {"section": "bpe", "name": f"encode {n / 1e6:g}M unspaced characters (longest pre-token {longest:,}),"
         f" {vocab_name}, s (vs tiktoken)", "ours": round(ours, 3), "reference": round(tik, 3), "unit": "s",
         "ratio": round(ours / tik, 2), "target": "ratio <= 10", "met": ours / tik <= 10, "note": ""},
        {"section": "bpe", "name": f"encode {2 * n / 1e6:g}M vs {n / 1e6:g}M unspaced characters, time ratio",
         "ours": round(ours2 / ours, 2), "reference": round(tik2 / tik, 2), "unit": "x",
         "ratio": None, "target": "ours <= 2.2", "met": ours2 / ours <= 2.2,
         "note": f"reference = tiktoken's ratio; {ours2:.2f} s for {2 * n / 1e6:g}M"}]


def bench_bpe(args):
    repeat = max(1, getattr(args, "repeat", 3) or 3)
    data = Path(getattr(args, "data", "") or Path(bpe.__file__).resolve().parent.parent / "shared" / "data")
    plays = corpora.plays_by_name()
    docs = list(plays.values())
    corpus_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    rows = []

    def row(name, ours, ref, unit, target, met, note=""):
        rows.append({"section": "bpe", "name": name, "ours": round(ours, 3), "reference": None if ref is None else round(ref, 3),
                     "unit": unit, "ratio": None if ref is None else round(ours / ref, 2), "target": target,
                     "met": met, "note": note})

    # 1. training at 4,096 on the built-in corpus; runs take turns so load changes hit all alike
    (ours, hf, serial), (trained, _, _) = cp.timed(
        [lambda: Tokenizer.train(docs, 4096), lambda: hf_train(docs, 4096),
         lambda: Tokenizer.train(docs, 4096, workers=1)], repeat, gc_on=True)
    row(f"train 4096, {corpus_mb:.1f} MB plays, s (vs HF BpeTrainer)", ours, hf, "s", "ratio <= 3", ours / hf <= 3,
        f"{os.cpu_count()} workers")
    row("train 4096, one worker, s (vs HF BpeTrainer)", serial, hf, "s", "-", None)

    # 2. the naive trainer is far slower: time a few merges, beside the fast one on the same counts
    counts = bpe.count_pretokens(docs, GPT2_PATTERN, ["<|endoftext|>"], workers=1)
    n = 64
    t0 = time.perf_counter()
    naive = bpe.train_naive(counts, n)
    naive_s = time.perf_counter() - t0
    (fast_s,), _ = cp.timed([lambda: bpe.train_fast(counts, n)], repeat, gc_on=True)
    assert bpe.train_fast(counts, n) == naive
    row(f"naive trainer, {n} merges on the plays, s (vs incremental)", naive_s, fast_s, "s", "-", None,
        f"one run; ~{naive_s / n * 3839:.0f} s for 3,839 merges at that pace")

    # 3. encoding speed vs tiktoken, one thread each; ours cold (fresh cache) and warm
    have_gpt2 = (data / "gpt2_vocab.json").exists() and (data / "gpt2_merges.txt").exists()
    if have_gpt2:
        tok = Tokenizer.from_gpt2_files(data / "gpt2_vocab.json", data / "gpt2_merges.txt")
        texts = {"tinyshakespeare": (data / "tinyshakespeare.txt").read_text(encoding="utf-8"), "plays": "".join(docs)}
        vocab_name = "GPT-2 ranks"
    else:
        tok, texts, vocab_name = trained, {"plays": "".join(docs)}, "our 4096 ranks (no GPT-2 files)"
    enc = tiktoken.Encoding("bench", pat_str=tok.pattern, mergeable_ranks=tok.to_tiktoken_ranks(),
                            special_tokens=tok.special_tokens)
    for name, text in texts.items():
        mb = len(text.encode("utf-8")) / 1e6
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
        (tik, cold, warm), _ = cp.timed([lambda: enc.encode_ordinary(text),
                                         lambda: (tok.cache.clear(), tok.encode_ordinary(text)),
                                         lambda: tok.encode_ordinary(text)], repeat, gc_on=True)
        for label, s in (("cold cache", cold), ("warm cache", warm)):
            row(f"encode {name} ({mb:.1f} MB), {vocab_name}, {label}, MB/s (vs tiktoken)", mb / s, mb / tik, "MB/s",
                "ratio >= 0.3", mb / s >= 0.3 * mb / tik)

    # 4. peak memory of encode_iterable over a file of >= 100 MB, in a fresh process
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        block = "".join(docs).encode("utf-8")
        with open(big, "wb") as f:
            while f.tell() < 100 * 2**20:
                f.write(block)
        trained.save(Path(tmp) / "tok.json")
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(Path(tmp) / "tok.json"), str(big),
                              str(Path(bpe.__file__).resolve().parent)], capture_output=True, text=True, check=True)
        base, peak, n_ids, dt = map(float, out.stdout.split())
        size = big.stat().st_size / 2**20
    row(f"encode_iterable over a {size:.0f} MiB file, peak RSS, MiB", peak, None, "MiB", "< 100", peak < 100,
        f"{base:.0f} MiB after import+load; {n_ids / 1e6:.1f}M ids at {size / dt:.1f} MiB/s")

    # 5. one long pre-token: 1M characters without a space (letters, CJK, base64), and 2M
    rows += bench_bpe_long(tok, enc, vocab_name, repeat)

    print(f"\nbpe.py benchmarks (median of {repeat}; ratio = ours / reference)")
    for r in rows:
        ref = "" if r["reference"] is None else f" ref {r['reference']}"
        ratio = "" if r["ratio"] is None else f" ratio {r['ratio']}"
        print(f"  {r['name']}: {r['ours']}{ref}{ratio}  target {r['target']}  met {r['met']}  {r['note']}")
    return rows


# ======================================================================
# data: does the loader keep up with training?
# ======================================================================

def median_rate(fn, units, repeat):
    """units / the median seconds of one call of fn."""
    return units / cp.timed([fn], repeat, gc_on=True)[0][0]


def loader_rate(folder, B, T, sampler, repeat, steps=2000):
    loader = dl.DataLoader(folder, B, T, sampler=sampler, seed=0)
    loader.next_batch()
    return median_rate(lambda: [loader.next_batch() for _ in range(steps)], steps * B * T, repeat)


def train_rate(B, T, repeat, steps=10):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=T, vocab_size=65, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (B, T))
    y = torch.randint(0, 65, (B, T))

    def run(n):
        for _ in range(n):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(3)  # warm up: allocations, first-call overheads
    return median_rate(lambda: run(steps), steps * B * T, repeat)


def bench_data(args):
    repeat = max(3, getattr(args, "repeat", 5) or 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"  # 4M random tokens in 4 shards: the loader cannot tell
        rng = np.random.default_rng(0)
        for i in range(4):
            dl.write_shard(folder / f"{i:06d}.bin", rng.integers(0, 65, 1_000_000).astype(np.uint16))
        B, T = 12, 64
        # the fastest the training loop can go: on a busy machine one thread can beat several
        default, rates = torch.get_num_threads(), {}
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            rates[threads] = train_rate(B, T, repeat)
        torch.set_num_threads(default)
        threads = max(rates, key=rates.get)
        train = rates[threads]
        rows.append({"bench": "data", "what": f"CPU training step consumes (gpt.GPT 4x128, B=12, T=64, AdamW, "
                                              f"{threads} of {sorted(rates)} threads)",
                     "median": train, "unit": "tokens/s", "ratio": 1.0})
        for sampler in ("epoch", "random"):
            rate = loader_rate(folder, B, T, sampler, repeat)
            rows.append({"bench": "data", "what": f"DataLoader.next_batch, {sampler} sampler, B=12, T=64",
                         "median": rate, "unit": "tokens/s", "ratio": rate / train})
        rate = loader_rate(folder, 8, 1024, "epoch", repeat, steps=300)
        rows.append({"bench": "data", "what": "DataLoader.next_batch, epoch sampler, B=8, T=1024 (GPT-2 shape)",
                     "median": rate, "unit": "tokens/s", "ratio": rate / train})
        t0 = time.perf_counter()
        dl.prepare("", "bpe", vocab_size=512, out_dir=Path(tmp) / "data")
        cold = time.perf_counter() - t0
        warm = 1 / median_rate(lambda: dl.prepare("", "bpe", vocab_size=512, out_dir=Path(tmp) / "data"), 1, repeat)
        rows.append({"bench": "data", "what": "prepare(): built-in plays, bpe 512, cold (train + tokenize + write)",
                     "median": cold, "unit": "s", "ratio": None})
        rows.append({"bench": "data", "what": "prepare(): same call again, cached folder reused",
                     "median": warm, "unit": "s", "ratio": cold / warm})
    for r in rows:
        ratio = "" if r["ratio"] is None else f"  x{r['ratio']:,.1f}"
        print(f"{r['what']:<82s} {r['median']:>14,.3f} {r['unit']}{ratio}")
    return rows


# ======================================================================
# prepare: corpus -> shards, ours (bpe.py's GPT-2 + a pool) vs build-nanogpt's method (tiktoken + a pool)
# ======================================================================

def write_web_like_corpus(path, mb, seed=0):
    """A .jsonl corpus of about mb MB: documents of 50-2,000 words drawn with tinyshakespeare's
    word frequencies (its real vocabulary and punctuation), with numbers and paragraph breaks.
    Returns (documents, UTF-8 bytes of their text)."""
    src = Path(__file__).resolve().parent.parent / "shared" / "data" / "tinyshakespeare.txt"
    words = np.array(src.read_text().split() if src.exists() else "the cat sat on a mat .".split())
    rng, docs, nbytes = np.random.default_rng(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while nbytes < mb * 1e6:
            pick = words[rng.integers(0, len(words), rng.integers(50, 2000))].tolist()
            for k in rng.integers(0, len(pick), len(pick) // 40):  # numbers and paragraphs, as on the web
                pick[k] = f"{rng.integers(0, 10**rng.integers(1, 6))}\n\n" if k % 2 else str(rng.integers(0, 3000))
            text = " ".join(pick)
            f.write(json.dumps({"text": text}) + "\n")
            docs, nbytes = docs + 1, nbytes + len(text.encode())
    return docs, nbytes


# build-nanogpt's fineweb.py method, written out here: tiktoken's GPT-2 in a multiprocessing Pool
# (imap, chunksize 16), [<|endoftext|>] + ids per document as uint16, shards filled in order.
NANOGPT_PREPARE = r"""
import json, multiprocessing as mp, resource, sys, time
from pathlib import Path
import numpy as np, tiktoken

def init(ranks, pattern):
    global enc
    enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})

def tokenize(text):
    ids = [50256]
    ids.extend(enc.encode_ordinary(text))
    return np.array(ids, np.uint16)

def texts(path):
    with open(path, "rb") as f:
        for line in f:
            yield json.loads(line)["text"]

corpus, out, workers, shard = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ranks, pattern = json.loads(Path(sys.argv[5]).read_text()), sys.argv[6]
ranks = {bytes.fromhex(k): v for k, v in ranks.items()}
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
with mp.Pool(workers, initializer=init, initargs=(ranks, pattern)) as pool:
    buf, n, k, total = np.empty(shard, np.uint16), 0, 0, 0
    for toks in pool.imap(tokenize, texts(corpus), chunksize=16):
        total += len(toks)
        while n + len(toks) >= shard:  # fill the shard, save it, carry the rest over
            r = shard - n
            buf[n:] = toks[:r]
            np.save(out / f"shard_{k:06d}.npy", buf)
            k, n, toks = k + 1, 0, toks[r:]
        buf[n:n + len(toks)] = toks
        n += len(toks)
    if n:
        np.save(out / f"shard_{k:06d}.npy", buf[:n])
rss = [int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024,
       resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]  # VmHWM: this process since exec
print(json.dumps({"s": time.perf_counter() - t0, "tokens": total, "rss": rss}))
"""

OUR_PREPARE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[5])
import dataloader as dl
t0 = time.perf_counter()
meta = dl.prepare(sys.argv[1], "gpt2", out_dir=sys.argv[2], workers=int(sys.argv[3]), shard_tokens=int(sys.argv[4])).meta
rss = [int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024,
       resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]  # VmHWM: this process since exec
print(json.dumps({"s": time.perf_counter() - t0, "tokens": sum(s["tokens"] for s in meta["splits"].values()), "rss": rss}))
"""


def bench_prepare(args):
    """MB/s of text to shards, ours vs build-nanogpt's method, same corpus, same cores, in turns."""
    if not args.data or not (Path(args.data) / "gpt2_vocab.json").exists():
        print("skipped: needs --data with gpt2_vocab.json and gpt2_merges.txt")
        return []
    cores, rows = os.cpu_count() or 1, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        for f in corpora.GPT2_FILES:  # beside the corpus, where prepare(tokenizer="gpt2") looks
            (tmp / "corpus" / f).write_bytes((Path(args.data) / f).read_bytes())
        docs, nbytes = write_web_like_corpus(tmp / "corpus" / "web.jsonl", args.corpus_mb)
        ranks = Tokenizer.from_gpt2_files(*(tmp / "corpus" / f for f in corpora.GPT2_FILES)).to_tiktoken_ranks()
        (tmp / "ranks.json").write_text(json.dumps({k.hex(): v for k, v in ranks.items()}))
        print(f"corpus: {docs:,} documents, {nbytes / 1e6:,.0f} MB of text; {cores} processes each")
        shard = 100_000_000
        runs = {"ours": [], "nanogpt": []}
        for k in range(min(args.repeat, 3)):  # in turns; a fresh output folder each time
            for name, script, extra in (("ours", OUR_PREPARE, [str(ROOT)]),
                                        ("nanogpt", NANOGPT_PREPARE, [str(tmp / "ranks.json"), GPT2_PATTERN])):
                out = subprocess.run([sys.executable, "-c", script, str(tmp / "corpus" / "web.jsonl"),
                                      str(tmp / f"{name}{k}"), str(cores), str(shard), *extra],
                                     stdout=subprocess.PIPE, text=True, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                shutil.rmtree(tmp / f"{name}{k}")
        ours, ref = (statistics.median(r["s"] for r in runs[n]) for n in ("ours", "nanogpt"))
        # the same ids: each split's first document has no <|endoftext|> before it in ours
        assert runs["ours"][0]["tokens"] + 2 == runs["nanogpt"][0]["tokens"], (runs["ours"][0], runs["nanogpt"][0])
        rss = max(r["rss"][0] for r in runs["ours"]), max(r["rss"][1] for r in runs["ours"])
        ref_rss = max(r["rss"][0] for r in runs["nanogpt"]), max(r["rss"][1] for r in runs["nanogpt"])
        for what, s, r, ratio in (("prepare(): bpe.py GPT-2, process pool, 100M-token shards", ours, rss, ref / ours),
                                  ("build-nanogpt's method: tiktoken GPT-2, Pool.imap, uint16 shards", ref, ref_rss, 1.0)):
            rows.append({"bench": "prepare", "what": f"{what} ({cores} processes, {nbytes / 1e6:,.0f} MB)",
                         "median": nbytes / 1e6 / s, "unit": "MB/s", "ratio": ratio,
                         "peak_rss_main_MB": r[0] / 1e6, "peak_rss_worker_MB": r[1] / 1e6})
            print(f"{rows[-1]['what']:<100s} {rows[-1]['median']:>8,.2f} MB/s  x{ratio:.2f}  "
                  f"peak RSS {r[0] / 1e6:,.0f} MB main, {r[1] / 1e6:,.0f} MB largest worker")
    return rows


# ======================================================================
# model: block.py / gpt.py against transformers' GPT-2
# ======================================================================

def _models(name, device):
    cfg = gpt.get_config(name, dropout=0.0)
    torch.manual_seed(0)
    ours = gpt.GPT(cfg).to(device)
    hf = GPT2LMHeadModel(GPT2Config(**gpt.hf_config_kwargs(cfg))).to(device)
    hf.load_state_dict(ours.to_hf())  # same weights: same logits, same work
    return ours, hf


def _row(bench, device, ours_s, hf_s, tokens, note=""):
    ours, ref = tokens / ours_s, tokens / hf_s
    return {"bench": bench, "device": device, "ours_tok_s": round(ours, 1),
            "transformers_tok_s": round(ref, 1), "ratio": round(ours / ref, 3), "note": note}


def bench_model(args):
    device = torch.device(getattr(args, "device", None) or "cpu")
    repeat = getattr(args, "repeat", None) or 5
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext
    rows = []
    # forward + backward
    shapes = {"tiny": (16, 128), "gpt2": (8, 1024) if cuda else (1, 256)}
    for preset, (B, T) in shapes.items():
        ours, hf = _models(preset, device)
        idx = torch.randint(0, ours.config.vocab_size, (B, T), device=device)

        def step_ours():
            with amp():
                loss = ours(idx, idx)[1]
            loss.backward()
            ours.zero_grad(set_to_none=True)

        def step_hf():
            with amp():
                loss = hf(input_ids=idx, labels=idx).loss
            loss.backward()
            hf.zero_grad(set_to_none=True)

        (t_ours, t_hf), _ = cp.timed([step_ours, step_hf], repeat, device, warmup=1, gc_on=True)
        rows.append(_row(f"fwd+bwd {preset} B={B} T={T}", name, t_ours, t_hf, B * T,
                         "bf16 autocast" if cuda else "float32"))
    # generation, greedy, batch 1
    lengths = {"tiny": (16, 100), "gpt2": (32, 128) if cuda else (32, 32)}
    for preset, (P, N) in lengths.items():
        ours, hf = _models(preset, device)
        ours.eval(), hf.eval()
        prompt = torch.randint(0, ours.config.vocab_size, (1, P), device=device)
        for cache in (True, False):
            def gen_ours():
                with amp():
                    out = ours.generate(prompt, N, temperature=0, use_cache=cache)
                assert out.shape[1] == P + N

            def gen_hf():
                with amp(), torch.no_grad():
                    hf.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                use_cache=cache, pad_token_id=0)
            (t_ours, t_hf), _ = cp.timed([gen_ours, gen_hf], repeat, device, warmup=1, gc_on=True)
            rows.append(_row(f"generate {preset} {'with' if cache else 'without'} KV cache, "
                             f"prompt {P} + {N} new", name, t_ours, t_hf, N))
    print_rows(rows)
    return rows


def print_rows(rows):
    print(f"{'benchmark':52s} {'ours tok/s':>12s} {'HF tok/s':>12s} {'ratio':>7s}  device")
    for r in rows:
        print(f"{r['bench']:52s} {r['ours_tok_s']:12,.0f} {r['transformers_tok_s']:12,.0f} "
              f"{r['ratio']:7.2f}  {r['device']} {r['note']}")


# ======================================================================
# primer: cuda_primer.py's measured ceilings, fusion and kernels
# ======================================================================

def bench_primer(args):
    cp.repeat = max(3, getattr(args, "repeat", 5) or 5)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, peak = cp.device_name(dev), device_peak(dev)[1]
    rows = []

    def row(what, median, unit, ratio=None):
        rows.append({"bench": "primer", "what": f"{what} [{name}]", "median": median,
                     "unit": unit, "ratio": ratio})

    mb, bw, matmuls = cp.measure_ceilings(dev)  # the primer's sizes and dtypes
    row(f"copy {mb} MB (read + write); ratio = of table peak", bw / 1e9, "GB/s",
        bw / peak["bandwidth"] if peak else None)
    for key, n, fl in matmuls:
        row(f"matmul {key} {n}^3; ratio = of table peak", fl / 1e12, "TFLOP/s",
            fl / peak[key] if peak and peak.get(key) else None)
    t0 = time.perf_counter()
    fusion = cp.fusion_demo(dev)  # prints its own table; compile time included once here
    for what, t, _, speedup in fusion + cp.kernels_demo(dev):
        row(f"{what}; ratio = speedup vs the first of its group", t * 1e3, "ms", speedup)
    print(f"(bench_primer: {time.perf_counter() - t0:.0f} s for fusion and kernels)")
    return rows


# ======================================================================
# train: shakespeare-char, nanoGPT's baseline config vs our preset; the 16 GB fit
# ======================================================================

GiB = 2**30


def find_shakespeare(data):
    p = Path(data or ROOT.parent / "shared" / "data")
    p = p if p.suffix == ".txt" else p / "tinyshakespeare.txt"
    return p if p.is_file() else None


def run_preset(name, text, data_dir, out_root, **overrides):
    """One full run (model build, training, final eval on the whole val split), timed."""
    c = train.make_config(preset=name, data=str(text), data_dir=str(data_dir), sample_tokens=0,
                          out_dir=tempfile.mkdtemp(dir=out_root), init="scratch", **overrides)
    t0 = time.perf_counter()
    r = train.train(c)
    wall = time.perf_counter() - t0
    return {"preset": name, "steps": r["step"], "tokens": r["step"] * c.batch_size * c.block_size,
            "tokens_per_s": r["step"] * c.batch_size * c.block_size / wall, "wall_s": wall,
            "val_loss": r["val_loss"], "threads": torch.get_num_threads()}


# the side-by-side: nanoGPT's configuration, our AdamW preset, the speedrun preset (train.py)
SIDE_BY_SIDE = [("shakespeare-char-baseline", "shakespeare-char-baseline", {}),
                ("shakespeare-char", "shakespeare-char", {}),
                ("shakespeare-char-speedrun", "shakespeare-char-speedrun", {})]
# the ablation: each idea alone on top of shakespeare-char, same steps (docs/speedrun.md)
ABLATION = [("shakespeare-char (none)", "shakespeare-char", {}),
            ("+ Muon", "shakespeare-char", dict(optimizer="muon")),
            ("+ ReLU^2 MLP", "shakespeare-char", dict(mlp="relu2")),
            ("+ QK-norm", "shakespeare-char", dict(qk_norm=True)),
            ("+ zero-init projections", "shakespeare-char", dict(zero_init_proj=True)),
            ("+ untied head", "shakespeare-char", dict(tie_embeddings=False)),
            ("+ logit softcap 15", "shakespeare-char", dict(logit_softcap=15.0))]


def bench_shakespeare(text, repeat, threads=1, contenders=SIDE_BY_SIDE, target=0.25):
    """Each contender (label, preset, overrides) `repeat` times, taking turns, medians; the
    wall-time ratio of each against the first."""
    rows = {label: [] for label, _, _ in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        train.prepare(str(text), "char", out_dir=str(data_dir), val_fraction=0.1)  # untimed
        for i in range(repeat):  # alternate, so all see the same machine load
            for label, name, kw in contenders:
                # the same thread count for all: on a shared 2-core machine a second
                # thread waits on the other processes and can cost 10x
                r = run_preset(name, text, data_dir, tmp, threads=threads, **kw)
                rows[label].append(r)
                print(f"  run {i + 1}/{repeat} {label:27s} {r['steps']:5d} steps "
                      f"{r['wall_s']:6.1f} s  val {r['val_loss']:.4f}  ({r['threads']} threads)",
                      flush=True)
    out = []
    for (label, name, kw), runs in zip(contenders, rows.values()):
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("wall_s", "tokens_per_s", "val_loss")}
        out.append({"bench": "train", "name": label, "preset": name, "overrides": kw,
                    "steps": runs[0]["steps"], "tokens": runs[0]["tokens"], "runs": len(runs),
                    **med, "val_losses": [round(r["val_loss"], 4) for r in runs],
                    "wall_times": [round(r["wall_s"], 1) for r in runs]})
    for r in out:
        r["wall_ratio"] = r["wall_s"] / out[0]["wall_s"]
    print(f"\n{'run':27s} {'steps':>6s} {'tokens':>10s} {'tok/s':>8s} {'wall s':>7s} "
          f"{'val loss':>9s} {'x wall':>7s}  runs")
    for r in out:
        print(f"{r['name']:27s} {r['steps']:6d} {r['tokens']:10,d} {r['tokens_per_s']:8.0f} "
              f"{r['wall_s']:7.1f} {r['val_loss']:9.4f} {r['wall_ratio']:7.2f}  {r['val_losses']}")
    if target:
        print(f"wall time ratio against {out[0]['name']}: " + ", ".join(
            f"{r['name']} {r['wall_ratio']:.2f}" for r in out[1:])
            + f"  (target for {out[-1]['name']}: <= {target:.2f} with val loss <= 1.88)")
    return out


def activation_bytes(cfg, batch_size, dtype=torch.bfloat16):
    """Bytes autograd keeps for backward in one forward pass (each storage counted once,
    parameters excluded), measured with saved-tensor hooks on the CPU."""
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype):
            _, loss = model(x, x)
    return sum(seen.values()), model


def bench_fit_16gb():
    p = train.PRESETS_TRAIN["gpu-16gb"]
    cfg = gpt.GPTConfig(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                        block_size=p["block_size"], vocab_size=50257, pad_vocab=p["pad_vocab"])
    # two batch sizes separate what grows with the batch from what does not (autocast's
    # bf16 copies of the weights)
    act1, model = activation_bytes(cfg, 1)
    act2, _ = activation_bytes(cfg, 2)
    per_seq, fixed = act2 - act1, 2 * act1 - act2
    n = sum(t.numel() for t in model.parameters())  # as stored: tied once, padding included
    B = p["batch_size"]
    rows = [("parameters (fp32)", 4 * n), ("gradients (fp32)", 4 * n),
            ("AdamW m and v (fp32)", 8 * n),
            ("bf16 copies of the weights (autocast)", fixed),
            (f"activations: {B} x {per_seq / 2**20:.0f} MiB a sequence of {cfg.block_size}",
             B * per_seq),
            # not saved for backward, but alive for a moment in it: the loss's gradient
            # with respect to the logits, fp32, one row of the (padded) vocabulary a token
            ("largest transient: fp32 gradient of the logits", 4 * B * cfg.block_size * cfg.padded_vocab)]
    total = sum(b for _, b in rows)
    print(f"\ngpu-16gb memory ({n / 1e6:.1f}M stored parameters, micro-batch {B} x "
          f"{cfg.block_size} tokens, grad_accum {p['grad_accum']}; eager, bf16 autocast)")
    for what, b in rows:
        print(f"  {what:48s} {b / GiB:6.2f} GiB")
    print(f"  {'total':48s} {total / GiB:6.2f} GiB  (a 16 GB card holds {16e9 / GiB:.1f} GiB)")
    return [{"bench": "train", "name": "gpu-16gb memory", "params": n, "bytes_params": 4 * n,
             "bytes_grads": 4 * n, "bytes_adamw": 8 * n, "bytes_weight_copies": fixed,
             "bytes_activations": B * per_seq, "bytes_total": total, "fits_15gb": total < 15e9}]


def bench_train(args):
    rows = []
    text = find_shakespeare(getattr(args, "data", None))
    if text is None:
        print("shakespeare benchmark skipped: no tinyshakespeare.txt (pass --data=../shared/data)")
    else:
        print(f"shakespeare-char: baseline vs ours on {text}, {args.repeat} run(s) each")
        rows += bench_shakespeare(text, args.repeat, getattr(args, "threads", 1))
    rows += bench_fit_16gb()
    return rows


def bench_ablation(args):
    """Each speedrun idea alone on top of shakespeare-char: val loss at the same steps, and
    what the idea costs in wall time (x wall against shakespeare-char itself)."""
    text = find_shakespeare(getattr(args, "data", None))
    if text is None:
        raise ValueError(f"the ablation needs tinyshakespeare.txt: pass --data=FOLDER "
                         f"(got {getattr(args, 'data', '')!r})")
    print(f"speedrun ablation on {text}, {args.repeat} run(s) each")
    return bench_shakespeare(text, args.repeat, getattr(args, "threads", 1), ABLATION, target=0)


# one training step by part (docs/speedrun.md "where the time goes"): the baseline's AdamW step,
# the speedrun preset before issue 27 (bf16 Newton-Schulz, our AdamW loop) and now
STEP_PARTS = [("baseline (AdamW)", "shakespeare-char-baseline", {}),
              ("speedrun before (bf16 NS)", "shakespeare-char-speedrun",
               dict(muon_ns_dtype="bfloat16", muon_adamw_fused=False)),
              ("speedrun now", "shakespeare-char-speedrun", {})]
PARTS = ("data", "forward", "backward", "clip", "optimizer", "other")


def bench_step(args, contenders=STEP_PARTS, steps=10):
    """train.train_step's parts, timed one by one, 1 thread: the contenders take turns one step
    at a time (a burst of load hits all of them), `steps` x --repeat turns after `steps` turns
    of warmup; medians in ms, and each step over the first contender's."""
    text = find_shakespeare(getattr(args, "data", None))
    if text is None:
        raise ValueError(f"the step profile needs tinyshakespeare.txt: pass --data=FOLDER "
                         f"(got {getattr(args, 'data', '')!r})")
    times = {label: {p: [] for p in PARTS + ("step",)} for label, _, _ in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for label, name, kw in contenders:
            c = train.make_config(preset=name, data=str(text), data_dir=str(Path(tmp) / "data"),
                                  out_dir=tempfile.mkdtemp(dir=tmp), init="scratch", threads=1,
                                  **kw)
            setups[label] = (c, train.build(c, 0, 1, torch.device("cpu")))
        for r in range(steps * (args.repeat + 1)):
            for label, (c, s) in setups.items():
                t = [time.perf_counter()]
                x, y = s.loader.next_batch()
                t.append(time.perf_counter())
                _, loss = s.model(x, y)
                t.append(time.perf_counter())
                loss.backward()
                t.append(time.perf_counter())
                torch.nn.utils.clip_grad_norm_(s.raw.parameters(), c.grad_clip)
                t.append(time.perf_counter())
                s.opt.step()
                t.append(time.perf_counter())
                s.opt.zero_grad(set_to_none=True)
                loss.item()
                t.append(time.perf_counter())
                if r >= steps:  # the first turns are warmup
                    for part, a, b in zip(PARTS, t[:-1], t[1:]):
                        times[label][part].append(b - a)
                    times[label]["step"].append(t[-1] - t[0])
    rows, first = [], None
    for label, parts in times.items():
        ms = {p: 1e3 * statistics.median(v) for p, v in parts.items()}
        first = first or ms["step"]
        rows.append({"bench": "step", "name": label, **ms, "ratio": ms["step"] / first})
        print(f"{label:27s} " + " ".join(f"{p} {ms[p]:6.1f}" for p in PARTS)
              + f" | step {ms['step']:6.1f} ms  {ms['step'] / first:.2f}x")
    return rows


# ======================================================================
# mfu: the 124M training micro-step on a GPU, one variant at a time
# ======================================================================

# (model, micro-batch, torch.compile mode or None for eager, SDPA backend or None for torch's
# choice, loss). Row 0 is train.py's gpu-16gb micro-step; "hf" is the reference, transformers'
# GPT-2 (unpadded vocabulary, SDPA attention) compiled the same way. Slow compiles come last.
MFU_VARIANTS = [
    ("ours", 8, "default", None, "slice"),
    ("hf", 8, "default", None, "-"),
    ("ours", 8, None, None, "slice"),
    ("ours", 16, "default", None, "slice"),
    ("ours", 16, "default", None, "mask"),
    ("ours", 16, "default", "flash", "slice"),
    ("ours", 16, "default", "cudnn", "slice"),
    ("ours", 32, "default", None, "slice"),
    ("ours", 16, "reduce-overhead", None, "slice"),
    ("ours", 16, "max-autotune-no-cudagraphs", None, "slice"),
]


def masked_loss(model):
    """The same loss as gpt.GPT.forward's, over the padded vocabulary with the padding columns
    at -inf instead of sliced off: their probability is exactly 0, and no strided copy of the
    (B, T, vocab) logits is made."""
    c = model.config
    pad = torch.zeros(c.padded_vocab, device=model.lm_head.weight.device)
    pad[c.vocab_size:] = float("-inf")

    def loss(idx, targets):
        logits = model.lm_head(model.hidden(idx)) + pad             # (B, T, padded vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=-1)
    return loss


def mfu_step(variant, device, repeat, micro=4):
    """Tokens/s of fwd + bwd (bf16 autocast, gradients accumulating as in train.py) for one
    variant, median of `repeat` timings of `micro` micro-steps; peak memory; compile time.
    Without a GPU: the tiny model in float32 at a quarter of the batch, to try the code paths."""
    kind, B, mode, backend, loss_kind = variant
    cuda = device.type == "cuda"
    cfg = gpt.get_config("gpt2" if cuda else "tiny", dropout=0.0)
    B = B if cuda else max(1, B // 4)
    torch.manual_seed(0)
    ours = gpt.GPT(cfg).to(device)
    if kind == "hf":
        model = GPT2LMHeadModel(GPT2Config(**gpt.hf_config_kwargs(cfg))).to(device)
        fn = lambda x, y: model(input_ids=x, labels=y).loss  # noqa: E731
    else:
        fn = masked_loss(ours) if loss_kind == "mask" else (lambda x, y: ours(x, y)[1])
    fn = torch.compile(fn, mode=mode) if mode else fn
    sdpa = torch.nn.attention
    backends = {"flash": sdpa.SDPBackend.FLASH_ATTENTION, "cudnn": sdpa.SDPBackend.CUDNN_ATTENTION}
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), device=device)
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()

    def steps(n=micro):
        with sdpa.sdpa_kernel(backends[backend]) if backend else contextlib.nullcontext():
            for _ in range(n):
                with amp:
                    loss = fn(x, x)
                loss.backward()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    steps(3)  # compiles, autotunes, warms up
    if cuda:
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    seconds = cp.timed([steps], repeat, device, gc_on=True)[0][0] / micro
    tps = B * cfg.block_size / seconds
    peak = device_peak(device)[1]
    return {"bench": "mfu", "device": device_peak(device)[0], "model": kind, "micro_batch": B,
            "compile": mode or "eager", "sdpa": backend or "auto", "loss": loss_kind,
            "tokens_per_s": tps, "mfu": train.mfu(ours.flops_per_token(), tps, peak and peak["bf16"]),
            "peak_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
            "compile_s": compile_s}


def bench_mfu(args):
    device = torch.device(getattr(args, "device", None) or "cpu")
    picked = [int(i) for i in args.variants.split(",")] if getattr(args, "variants", "") else None
    variants = [v for i, v in enumerate(MFU_VARIANTS) if picked is None or i in picked]
    if device.type != "cuda":  # a quick run of the code paths with the tiny model
        print("no GPU: the tiny model, float32, eager only (MFU needs a GPU)")
        variants = list(dict.fromkeys((m, B, None, None, loss) for m, B, _, _, loss in variants))
    rows = []
    print(f"{'#':>2s} {'model':5s} {'B':>3s} {'compile':27s} {'sdpa':6s} {'loss':6s} "
          f"{'tok/s':>10s} {'MFU':>6s} {'GiB':>6s} {'compile s':>9s}")
    for v in variants:
        r = mfu_step(v, device, getattr(args, "repeat", None) or 5)
        rows.append(r)
        mfu_s = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        gib = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        i = MFU_VARIANTS.index(v) if v in MFU_VARIANTS else "-"
        print(f"{i:>2} {v[0]:5s} {r['micro_batch']:3d} {r['compile']:27s} {r['sdpa']:6s} "
              f"{v[4]:6s} {r['tokens_per_s']:10,.0f} {mfu_s:>6s} {gib:>6s} {r['compile_s']:9.1f}",
              flush=True)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ======================================================================
# evals: HellaSwag scoring (evals.py) vs the same sums through transformers
# ======================================================================

def hellaswag_like(n, vocab, seed=0):
    """n HellaSwag-shaped examples as token ids: a 60-token context, 4 endings of 10 to 30."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, vocab, (k,), generator=g).tolist()
    lens = lambda: torch.randint(10, 31, (4,), generator=g).tolist()
    return [{"ind": k, "label": k % 4, "ctx": "", "endings": ["x" * m for m in ms],
             "ctx_ids": ids(60), "ending_ids": [ids(m) for m in ms]}
            for k, ms in ((k, lens()) for k in range(n))]


def hf_hellaswag(hf, examples, device):
    """The reference: each example's 4 rows padded into one batch, full logits, log_softmax,
    the ending positions summed; returns the predictions by sum."""
    preds = []
    with torch.no_grad():
        for ex in examples:
            rows = [ex["ctx_ids"] + e for e in ex["ending_ids"]]
            T = max(map(len, rows)) - 1
            x = torch.zeros(4, T, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, :len(row) - 1] = torch.tensor(row[:-1])
            logp = torch.log_softmax(hf(x.to(device)).logits.float(), -1).cpu()
            sums = [logp[r, len(ex["ctx_ids"]) - 1 + torch.arange(len(e)), torch.tensor(e)].sum()
                    for r, e in enumerate(ex["ending_ids"])]
            preds.append(int(torch.stack(sums).argmax()))
    return preds


def bench_evals(args):
    """HellaSwag scoring speed: evals.score_hellaswag (4 rows in one forward, the LM head only
    at the ending positions) vs transformers (full logits) vs our readable path (one row, full
    logits), same weights; the predictions must agree. Units: input tokens per second."""
    import evals
    device = torch.device(getattr(args, "device", None) or "cpu")
    repeat = getattr(args, "repeat", None) or 5
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for preset, n in {"tiny": 32, "gpt2": 64 if cuda else 4}.items():
        ours, hf = _models(preset, device)
        ours.eval(), hf.eval()
        examples = hellaswag_like(n, ours.config.vocab_size)
        tokens = sum(4 * len(ex["ctx_ids"]) + sum(map(len, ex["ending_ids"])) for ex in examples)

        def fast():
            return [r["pred"] for r in evals.score_hellaswag(ours, None, examples)[1]]

        def readable():
            return [evals.argmax([evals.score_one(ours, ex["ctx_ids"], e) for e in ex["ending_ids"]])
                    for ex in examples]

        (t_fast, t_read, t_hf), (p_fast, p_read, p_hf) = cp.timed(
            [fast, readable, lambda: hf_hellaswag(hf, examples, device)], repeat, device,
            warmup=1, gc_on=True)
        if not p_fast == p_read == p_hf:
            raise RuntimeError(f"hellaswag {preset}: the predictions differ")
        rows.append(_row(f"hellaswag {preset}, {n} examples: batched", name, t_fast, t_hf, tokens,
                         "float32"))
        rows.append(_row(f"hellaswag {preset}, {n} examples: readable path", name, t_read, t_hf,
                         tokens, "float32, one row per forward"))
    print_rows(rows)
    return rows


# ======================================================================
# kernels: kernels.py's Triton kernels vs torch's (GPU only; on a CPU they are checked, not
# timed: python cuda_primer.py --sections=kernels)
# ======================================================================

def kernel_rows(device, group, variants, make_call, repeat, flops=None):
    """Time make_call(fn) for each of variants {name: fn}, taking turns; one row each with the
    median, the ratio to the first variant, TFLOP/s if flops, and the peak memory of one call
    above what was allocated before it. A variant that fails to run (a backend this GPU lacks)
    is reported and left out."""
    calls = {}
    for name, fn in variants.items():
        try:
            call = make_call(fn)
            call()
            calls[name] = call
        except RuntimeError as e:
            print(f"  {name}: skipped ({' '.join(str(e).split())[:120]})")
    peaks = {}
    for name, call in calls.items():
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / GiB
    times, _ = cp.timed(list(calls.values()), repeat, device, warmup=3, calls=10)
    rows, first = [], times[0] if times else None
    print(f"{group}:")
    for (name, _), t in zip(calls.items(), times):
        tf = f"{flops / t / 1e12:7.1f} TFLOP/s" if flops else ""
        print(f"  {name:<40} {t * 1e3:9.3f} ms  x{first / t:5.2f} vs first  "
              f"+{peaks[name]:6.2f} GiB {tf}", flush=True)
        rows.append({"bench": "kernels", "group": group, "what": name, "ms": t * 1e3,
                     "speed_vs_first": first / t, "peak_gib": peaks[name],
                     "tflops": flops / t / 1e12 if flops else None})
    return rows


def kernel_step(kern, device, repeat, B=8, micro=4):
    """The GPT-2 124M training micro-step (bf16 autocast, eager), kernels="torch" or "triton":
    tokens/s, MFU and peak memory."""
    torch.manual_seed(0)
    model = gpt.GPT(gpt.get_config("gpt2", dropout=0.0, kernels=kern)).to(device)
    x = torch.randint(0, model.config.vocab_size, (B, model.config.block_size), device=device)

    def steps(n=micro):
        for _ in range(n):
            with torch.autocast("cuda", torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()  # gradients accumulate, as in train.py

    torch.cuda.reset_peak_memory_stats(device)
    steps(2)
    seconds = cp.timed([steps], repeat, device, gc_on=True)[0][0] / micro
    tps = B * model.config.block_size / seconds
    peak = device_peak(device)[1]
    r = {"bench": "kernels", "group": "124M step", "what": f"kernels={kern}",
         "tokens_per_s": tps, "mfu": train.mfu(model.flops_per_token(), tps, peak and peak["bf16"]),
         "peak_gib": torch.cuda.max_memory_allocated(device) / GiB}
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    print(f"  kernels={kern:<7} {tps:10,.0f} tokens/s  MFU {mfu:>6}  peak {r['peak_gib']:.2f} GiB",
          flush=True)
    del model
    torch.cuda.empty_cache()
    return r


def bench_kernels(args):
    device = torch.device(getattr(args, "device", None) or "cpu")
    if device.type != "cuda":
        print("needs CUDA: kernels.py is timed on a GPU only (--device=cuda); skipped. On a CPU, "
              "python cuda_primer.py --sections=kernels checks each kernel under the interpreter")
        return []
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels
    rep, bf16 = args.repeat, torch.bfloat16
    print(f"device: {device_peak(device)[0]}; medians of {rep}, 10 calls each, taking turns")
    cc = torch.cuda.get_device_capability(device)
    print(f"FlashAttention tiles for compute capability {cc[0]}.{cc[1]} (kernels.FLASH_TILES, "
          f"checked by sass.py): (BLOCK_M, BLOCK_N, num_warps, num_stages) = "
          f"{kernels._tiles(64, cc)} at head dim 64")

    def rand(*shape, dtype=bf16, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    # FlashAttention-2 at GPT-2's shapes, causal; FLOPs: 2 matmuls of 2*T*T*D, half masked
    B, H, T, D = 8, 12, 1024, 64
    q, k, v, do = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)

    def sdpa(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attend

    attn = {"SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
            "ours (kernels.flash_attention)": kernels.flash_attention}
    with torch.no_grad():
        diff = (attn["ours (kernels.flash_attention)"](q, k, v) - attn["SDPA flash"](q, k, v))
    print(f"FA2 vs SDPA flash, bf16: max |diff| {diff.abs().max().item():.1e}")
    fwd = 2 * B * H * T * T * D
    rows = kernel_rows(device, f"attention forward, B={B} H={H} T={T} D={D} bf16 causal", attn,
                       lambda fn: lambda: fn(q, k, v), rep, fwd)

    def fwd_bwd(fn, inputs, grad):
        def call():
            for t in inputs:
                t.grad = None
            fn(*inputs).backward(grad)
        return call

    rows += kernel_rows(device, "attention forward + backward", attn,
                        lambda fn: fwd_bwd(fn, (q, k, v), do), rep, 3.5 * fwd)
    del q, k, v, do

    # norms: (8192, 768) bf16 activations, fp32 weights, as in a bf16 autocast model
    M, C = 8 * 1024, 768
    x, dy = rand(M, C), rand(M, C, grad=False)
    w, b = rand(C, dtype=torch.float32), rand(C, dtype=torch.float32)

    def amp(fn):
        def run(*a):
            with torch.autocast("cuda", bf16):
                return fn(*a)
        return run

    ln = lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-5)  # noqa: E731
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    for group, eager, ours, ins in [("LayerNorm", ln, kernels.layer_norm, (x, w, b)),
                                    ("RMSNorm (block.py's, written out)", rms, kernels.rms_norm,
                                     (x, w))]:
        variants = {"eager (autocast)": amp(eager), "torch.compile": torch.compile(amp(eager)),
                    "ours (kernels.py)": ours}
        rows += kernel_rows(device, f"{group} forward + backward, ({M}, {C})", variants,
                            lambda fn, ins=ins: fwd_bwd(lambda *a: fn(*a).float(), ins, dy.float()),
                            rep)

    # the loss over GPT-2's padded vocabulary; every variant first copies the logits (a fresh
    # non-leaf buffer each call, which the fused loss overwrites with the gradient)
    V, Vp = 50257, 50304
    wide = rand(M, Vp)
    t = torch.randint(0, V, (M,), device=device)
    eager = lambda z: F.cross_entropy(z.float(), t, ignore_index=-1)  # noqa: E731  (autocast)
    loss = {"eager (fp32, as autocast)": eager, "torch.compile": torch.compile(eager),
            "ours, fused in place": lambda z: kernels.cross_entropy(z, t, -1, inplace=True)}

    def loss_call(fn):
        def call():
            wide.grad = None
            fn(wide[:, :V] * 1.0).backward()
        return call

    rows += kernel_rows(device, f"cross-entropy forward + backward, ({M}, {V}) bf16 logits",
                        loss, loss_call, rep)
    del wide, x, dy
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    print("GPT-2 124M training micro-step, batch 8 x 1024, bf16 autocast, eager:")
    rows += [kernel_step(k, device, rep) for k in ("torch", "triton")]
    return rows


# ======================================================================
# main
# ======================================================================

SECTIONS = {"micrograd": bench_micrograd, "bpe": bench_bpe, "data": bench_data, "prepare": bench_prepare,
            "model": bench_model, "primer": bench_primer, "train": bench_train,
            "ablation": bench_ablation, "step": bench_step, "mfu": bench_mfu, "evals": bench_evals,
            "kernels": bench_kernels}


def check_options():
    """Every option before any section runs (one line naming it: cli.check, cli.one_of,
    gpt.pick_device). An explicit --data that is not there is an error, not a skip. Returns
    (section names, device)."""
    names = list(SECTIONS) if only == "all" else only.split(",")
    for name in names:
        cli.one_of("section", name, list(SECTIONS))
    dev = gpt.pick_device(device)  # "auto" becomes the device it picks
    cli.check(globals(), [
        ("repeat", repeat >= 1, "at least 1"),
        ("corpus_mb", 1 <= corpus_mb <= 10**6, "in [1, 1000000] (MB of generated text)"),
        ("variants", all(i.isascii() and i.isdigit() and int(i) < len(MFU_VARIANTS)
                         for i in variants.split(",") if variants),
         f"indices 0..{len(MFU_VARIANTS) - 1} like 0,3"),
        ("out", out != "" and not Path(out).is_dir(), "a file path (not a folder)"),
        ("data", not data or Path(data).exists(),
         "an existing file or folder (or empty: ../shared/data when it is there)"),
        ("data", not data or "train" not in names or find_shakespeare(data) is not None,
         "a tinyshakespeare.txt, or a folder holding one, for the train section")])
    return names, str(dev)


def main():
    names, dev = check_options()
    default = Path(__file__).resolve().parent.parent / "shared" / "data"
    args = types.SimpleNamespace(data=data or (str(default) if default.exists() else ""),
                                 repeat=repeat, device=dev, variants=variants,
                                 corpus_mb=corpus_mb)
    results = {}
    for name in names:
        print(f"\n## {name}")
        t0 = time.perf_counter()
        results[name] = SECTIONS[name](args)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)")
    if not any(results.values()):  # an old bench.json is worth more than an empty one
        print(f"\nno rows: {out} left as it was")
        return
    with cli.atomic_open(out) as f:  # whole or not at all, and only after every section ran
        f.write(json.dumps(results, indent=1, default=str).encode())
    print(f"\nrows written to {out}")


if __name__ == "__main__":
    cli.run(main, globals())
