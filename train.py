"""train.py - the training loop, from a 2-core laptop to a 124M GPT-2 on one GPU or many.

What you will learn
  * the optimizers (optim.py, read it first): AdamW written out, and Muon beside it
    (--optimizer=muon), each checked step for step against torch.optim;
  * learning-rate schedules (gpt.lr_at): linear warmup, then cosine or warmup-stable-decay (WSD);
  * gradient accumulation, clipping (the norm is logged), mixed precision (bf16 autocast, fp16
    with a GradScaler), TF32 matmuls, torch.compile, activation checkpointing, and
    data-parallel training with torchrun (DDP);
  * evaluation as val loss and bits per byte, so char-level and BPE runs compare; MFU: how
    much of the chip's peak arithmetic the model actually uses;
  * checkpoints that resume exactly (model, optimizer, every RNG, data position: resume.py),
    written atomically, refusing a different model; Ctrl-C saves before exiting; a NaN stops
    the run.

Run it
  python train.py                      # "cpu" preset: built-in plays, minutes on 2 cores
  python train.py --preset=shakespeare-char --data=../shared/data/tinyshakespeare.txt
  python train.py --preset=laptop-8gb  # ~10M parameters, under 3 GB of RAM
  python train.py --preset=gpu-16gb --data=my_corpus/   # the 124M GPT-2 on one 16 GB GPU
  torchrun --nproc_per_node=8 train.py --preset=gpu-80gb --data=my_corpus/
  python train.py --help               # every constant below is an --name=value option

A run writes out_dir/ckpt_*.pt (the last few), out_dir/log.jsonl and out_dir/loss.png (the
curve drawn from that log, cli.plot_log; --plot=false skips it); run the same command
again and it resumes from the newest checkpoint (--init=scratch refuses to overwrite one).
One run per out_dir: a second one started on the same folder refuses, naming the first's pid.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import evals
import gpt
import optim
from dataloader import DataLoader, is_prepared, prepare
from resume import checkpoints, resume, rng_state, save_run  # checkpoints that resume exactly
from gpt import lr_at  # the schedule, shared with gpt.py's demo and finetune.py

# ----------------------------------------------------------------------------- hyperparameters
preset = "cpu"           # a name from PRESETS_TRAIN below; explicit --name=value wins
# data
data = ""                # text file, folder of .txt or .jsonl; "" = the built-in plays
tokenizer = "char"       # "char", "bpe" (train one of vocab_size ids) or "gpt2" (GPT-2's files)
vocab_size = 512         # for tokenizer="bpe"
val_frac = 0.1           # share of the data held out for validation
data_dir = "out/data"    # prepared shards are cached here (see dataloader.prepare)
gpt2_dir = ""            # tokenizer="gpt2": the folder with GPT-2's vocab and merges files
sampler = "epoch"        # "epoch": every window once per epoch; "random": windows at random
# model: the architecture family comes from gpt.PRESETS, the size from here
arch = "gpt2"            # "gpt2" (LayerNorm, GELU, learned positions) or "llama"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128         # context length
dropout = 0.0
pad_vocab = 1            # round the vocabulary up to a multiple of this (64 makes GPUs happy)
# speedrun options (docs/speedrun.md), each off by default
mlp = ""                 # "" = the arch's MLP; "gelu", "swiglu" or "relu2" (ReLU squared)
qk_norm = False          # RMS-normalise queries and keys per head
zero_init_proj = False   # output projections start at zero: each block starts as the identity
tie_embeddings = True    # False: an LM head of its own instead of the embedding matrix
logit_softcap = 0.0      # C > 0: logits = C * tanh(logits / C)
# optimization
batch_size = 16          # sequences per micro-batch, per process
grad_accum = 1           # micro-batches per optimizer step, over all processes together
max_iters = 1180         # the cpu preset's (see PRESETS_TRAIN): Muon's steps in AdamW's 1,500's time
lr = 2e-3
min_lr = 2e-4
schedule = "cosine"      # "cosine" or "wsd" (warmup, stable, then a linear decay)
warmup_iters = 50
decay_frac = 0.2         # wsd: the last fraction of the steps decays to min_lr
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0          # max gradient norm; 0 = no clipping (the norm is still logged)
optimizer = "muon"       # "muon" (Muon for the hidden matrices, our AdamW for the rest), "ours"
                         # (AdamW written out in optim.py), "torch", "fused" (torch, one kernel)
muon_lr = 0.02           # optimizer="muon": peak lr of the Muon matrices (follows the schedule)
muon_momentum = 0.95
muon_weight_decay = 0.0
muon_split_qkv = False   # optimizer="muon": attention's Q, K, V orthogonalized as 3 matrices
muon_ns_dtype = "bfloat16"  # Newton-Schulz's matmuls: "bfloat16" (torch's; GPUs) or "float32"
                         # (about 2x faster on a CPU: its small bf16 matmuls are slow there)
muon_ns_steps = 5        # Newton-Schulz steps (each: 3 matmuls per matrix)
muon_adamw_fused = False # Muon's AdamW groups (embeddings, norms, biases) in torch's fused kernel
# system
device = "auto"          # "auto", "cpu", "cuda", "cuda:N", "mps"
dtype = "auto"           # "auto", "float32", "bfloat16", "float16"
compile = False          # torch.compile the model
kernels = "torch"        # "torch" or "triton" (kernels.py: attention, norms, loss; needs triton)
checkpointing = False    # activation checkpointing: recompute blocks in backward, less memory
threads = 0              # torch CPU threads; 0 = torch's choice
seed = 1337
# evaluation, logging, checkpoints
eval_interval = 500      # steps between evaluations (and at the end)
eval_iters = 20          # val batches per evaluation; 0 = the whole val split
log_interval = 50
sample_tokens = 300      # tokens sampled at each evaluation (0 = none)
out_dir = "out/cpu"
save_interval = 500      # steps between checkpoints (and at the end)
keep_checkpoints = 3     # the newest K are kept
init = "auto"            # "auto" (resume if out_dir has a checkpoint), "scratch", or a .pt path
plot = True              # write out_dir/loss.png from log.jsonl at the end (matplotlib)
hellaswag = ""           # HellaSwag jsonl scored during training (evals.py); "" = off
hellaswag_every = 0      # steps between HellaSwag scores (and at the end); 0 = eval_interval
hellaswag_limit = 0      # score only the first N examples; 0 = all
eval_only = False        # score --init's checkpoint on --hellaswag and stop (no training)

# multi-process runs: how long the other processes wait while process 0 tokenizes the corpus
# (hours for a large one). Only that wait: the training collectives keep the backend's timeout
PREPARE_HOURS = 24


# ----------------------------------------------------------------------------- the loop
def train(c):
    """Train with the hyperparameters c (from make_config); returns a summary dict.
    Under torchrun, one process per GPU: it sets RANK, WORLD_SIZE and LOCAL_RANK for each.
    Process 0 holds out_dir for the whole run: a second run on the same folder refuses."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if c.grad_accum % world:  # micro-batches per step, over all processes: the same on each
        raise ValueError(f"--grad_accum={c.grad_accum} must be a multiple of the {world} processes")
    dev = gpt.pick_device(c.device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)  # one GPU per process
        torch.cuda.set_device(dev)
    if c.threads:
        torch.set_num_threads(c.threads)
    if dev.type == "cuda":  # TF32: fp32 matmuls on the tensor cores, 10-bit mantissa inputs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if c.eval_only:
        return score_checkpoint(c, world, dev)
    with hold_out_dir(c.out_dir) if rank == 0 else contextlib.nullcontext():
        if world > 1:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        try:
            return run(c, rank, world, dev)
        finally:
            if world > 1:
                dist.destroy_process_group()


def run(c, rank, world, dev):
    """One process's run: build everything (resuming if there is a checkpoint), then the loop:
    a step, a log line every log_interval steps, an evaluation and a checkpoint now and then."""
    s = build(c, rank, world, dev)
    step, last_ckpt, val, sample, logged = s.step, s.last_ckpt, (None, None), None, []
    meter = Meter(step)
    with catch_signals() as signals:
        while step < c.max_iters:
            lr, loss, norm, stop = train_step(c, s, step, signals, last_ckpt)
            step += 1
            meter.steps += 1
            if step % c.log_interval == 0 or step == c.max_iters or stop:
                logged.append(log_step(c, s, meter, step, lr, loss, norm))
            with meter.paused():  # evaluations and saves stay out of tokens/s
                if step % c.eval_interval == 0 or step == c.max_iters:
                    val, sample = evaluate_and_sample(c, s, step)
                if s.hellaswag and (step % (c.hellaswag_every or c.eval_interval) == 0
                                    or step == c.max_iters):
                    score_hellaswag(s, step)
                if step % c.save_interval == 0 or step == c.max_iters or stop:
                    last_ckpt = save(c, s, step)
            if stop:
                break
    if val[0] is None and not signals:  # no step ran (a finished run resumed): not a new row
        val, sample = evaluate_and_sample(c, s, step, log=False)
    return summarize(c, s, meter, step, val, sample, last_ckpt, signals, logged)


def train_step(c, s, step, signals, last_ckpt):
    """One optimizer step over grad_accum micro-batches: (lr, summed loss, gradient norm,
    whether a signal asks the run to stop). A non-finite loss or norm stops the run before
    the weights change."""
    lr = lr_at(step, c.lr, c.min_lr, c.warmup_iters, c.max_iters, c.schedule, c.decay_frac)
    for group in s.opt.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=s.dev)
    for micro in range(s.accum):
        x, y = s.loader.next_batch()
        # DDP averages gradients in backward: only on the last micro-batch (the earlier
        # ones just add into .grad)
        last = micro == s.accum - 1
        with s.model.no_sync() if s.world > 1 and not last else contextlib.nullcontext():
            with s.autocast:
                _, loss = s.model(x, y)
            s.scaler.scale(loss / s.accum).backward()  # mean over the micro-batches
        loss_sum += loss.detach()
    s.scaler.unscale_(s.opt)  # clip the true gradient, not the fp16-scaled one
    norm = torch.nn.utils.clip_grad_norm_(s.raw.parameters(), c.grad_clip or math.inf)
    # one small tensor carries "not finite" and "signal received" to every process
    watched = loss_sum if s.scaler.is_enabled() else loss_sum + norm  # fp16 may skip inf
    flags = torch.stack([(~torch.isfinite(watched)).float(),
                         torch.tensor(float(bool(signals)), device=s.dev)])
    if s.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    if bad:
        raise FloatingPointError(
            f"loss {loss_sum.item() / s.accum} or gradient norm {norm.item()} is not finite "
            f"at step {step}: stopped before updating; last good checkpoint: "
            f"{last_ckpt or 'none written yet'}")
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)
    return lr, loss_sum, norm, bool(stop)


def log_step(c, s, meter, step, lr, loss_sum, norm):
    """The log line and the log.jsonl row for this step (every process takes part: the loss
    is averaged over them); returns the row."""
    if s.world > 1:  # the mean over all processes (gloo has no AVG)
        dist.all_reduce(loss_sum)
        loss_sum /= s.world
    tps, elapsed = meter.rate(s.tokens_per_step)
    row = {"step": step, "loss": loss_sum.item() / s.accum, "lr": lr,
           "grad_norm": norm.item(), "tokens_per_s": tps,
           "mfu": mfu(s.flops_per_token, tps, s.peak_flops), "elapsed": elapsed}
    left = elapsed / (step - meter.start_step) * (c.max_iters - step)
    s.say(f"step {step:5d}/{c.max_iters} | loss {row['loss']:.4f} | lr {lr:.2e} | "
          f"norm {row['grad_norm']:.3f} | {tps / 1e3:.1f}k tok/s | "
          + (f"mfu {row['mfu']:.1%} | " if row["mfu"] is not None else "")
          + f"{gpt.fmt_time(elapsed)} elapsed, {gpt.fmt_time(left)} left")
    write_log(s, row)
    return row


def evaluate_and_sample(c, s, step, log=True):
    """((val loss, bits per byte), a sample continuing a val window or None)."""
    loss, bpb = evaluate(s.raw, s.val_batches, s.val_bytes, s.autocast, s.rank, s.world)
    s.say(f"step {step:5d} | val loss {loss:.4f} | {bpb:.3f} bits per byte")
    if log:
        write_log(s, {"step": step, "val_loss": loss, "val_bpb": bpb})
    sample = None
    if s.rank == 0 and c.sample_tokens:
        with s.autocast:  # continues the first 16 tokens of a val window
            out = s.raw.generate(s.val_batches[0][0][0, :16], c.sample_tokens, temperature=0.8,
                                 top_p=0.95, eot_id=s.eot, seed=c.seed)
        sample = s.tok.decode(out[0].tolist())
        s.say(f"sample at step {step}:\n{sample}")
    return (loss, bpb), sample


def score_hellaswag(s, step):
    """Accuracy on HellaSwag (evals.py), each rank scoring its share, logged with the step."""
    with s.autocast:
        m, _ = evals.score_hellaswag(s.raw, s.tok, s.hellaswag, s.rank, s.world)
    s.say(f"step {step:5d} | {evals.summary_line(m)}")
    write_log(s, {"step": step, **{f"hellaswag_{k}": v for k, v in m.items()}})


def score_checkpoint(c, world, dev):
    """--eval_only: HellaSwag on one checkpoint (--init=PATH, or out_dir's newest with
    --init=auto); prints the summary line, writes out_dir/hellaswag.jsonl (evals.py)."""
    if world > 1:
        raise ValueError("--eval_only runs in one process: start it with python, not torchrun")
    if not c.hellaswag:
        raise ValueError("--eval_only needs --hellaswag=PATH (a HellaSwag jsonl)")
    path = {"auto": (checkpoints(c.out_dir) or [None])[-1], "scratch": None}.get(c.init, c.init)
    if not path:
        raise ValueError(f"--eval_only needs a checkpoint: --init=PATH.pt, or a run in "
                         f"--out_dir={c.out_dir} (none there)")
    examples = evals.read_hellaswag(c.hellaswag, limit=c.hellaswag_limit)  # all checked first
    model, tok = evals.load_model(path, device=dev)
    ptdtype = torch.float32 if c.dtype == "auto" else getattr(torch, c.dtype)  # auto: exact
    with torch.autocast(dev.type, dtype=ptdtype, enabled=ptdtype != torch.float32):
        metrics = evals.run_hellaswag(model, tok, examples, c.out_dir)
    return {"interrupted": None, "checkpoint": path, "hellaswag": metrics}


def save(c, s, step):
    """Checkpoint the run at step (every process sends its RNGs); returns the path on process 0."""
    rngs = [rng_state()] * s.world
    if s.world > 1:  # every rank's generators, in rank order
        dist.all_gather_object(rngs, rng_state())
    if s.rank == 0:
        return save_run(c.out_dir, step, s.raw, c.keep_checkpoints, optimizer=s.opt.state_dict(),
                        scaler=s.scaler.state_dict(), rng=rngs, data=s.loader.state_dict(),
                        train_config=dataclasses.asdict(c), tokenizer=s.tok_path)
    return None


@torch.no_grad()
def evaluate(model, batches, n_bytes, autocast, rank=0, world=1):
    """(loss per token, bits per byte) over a fixed list of val batches, every world-th on each
    rank. Bits per byte = nats / ln 2 / UTF-8 bytes of the targets: longer tokens raise the
    loss per token but not per byte, so char-level and BPE runs compare."""
    model.eval()
    # on the model's device: NCCL reduces CUDA tensors only (and no .item() sync per batch)
    dev = next(model.parameters()).device
    nats, tokens = torch.zeros((), dtype=torch.float64, device=dev), 0
    for x, y in batches[rank::world]:
        with autocast:
            _, loss = model(x, y)
        nats += loss.detach().double() * y.numel()
        tokens += y.numel()
    total = torch.stack([nats, torch.tensor(tokens, dtype=torch.float64, device=dev)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item(), (total[0] / math.log(2) / n_bytes).item()


def summarize(c, s, meter, step, val, sample, last_ckpt, signals, logged):
    """The run's summary dict (and loss.png when --plot)."""
    mem = peak_memory(s.dev)
    if mem:
        s.say(f"peak memory: {mem / 2**30:.2f} GiB ({'CUDA' if s.dev.type == 'cuda' else 'RSS'})")
    summary = {"step": step, "val_loss": val[0], "val_bpb": val[1], "checkpoint": last_ckpt,
               "time": time.time() - meter.t0, "interrupted": signals[0] if signals else None,
               "peak_memory": mem, "log": logged, "tokens_per_s":
                   float(np.median([r["tokens_per_s"] for r in logged])) if logged else None}
    if sample is not None:
        summary["sample"] = sample
    if s.rank == 0 and c.plot:
        s.say(cli.plot_log(s.log_path, os.path.join(c.out_dir, "loss.png"))[0])
    return summary


# ----------------------------------------------------------------------------- building a run
class Setup(NamedTuple):
    """What build() makes for a run; the loop's functions read it, none changes it."""
    model: torch.nn.Module       # what the step calls: raw, maybe compiled, maybe DDP-wrapped
    raw: gpt.GPT                 # the plain module: saved, evaluated, sampled
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    tok: object
    tok_path: str                # the tokenizer file, named in each checkpoint
    val_batches: list
    val_bytes: int
    autocast: object
    dev: torch.device
    rank: int
    world: int
    accum: int                   # micro-batches per process per step
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    log_path: str
    step: int                    # where the run starts (0, or the resumed step)
    last_ckpt: str | None
    eot: int | None
    hellaswag: list | None       # tokenized HellaSwag examples (--hellaswag), or None
    say: Callable


def quiet(*args, **kwargs):
    """print on process 0, this on the others."""


def build(c, rank, world, dev):
    """Seeds, data, model, optimizer and scaler, then the resume from a checkpoint, then the
    model's wrappers (activation checkpointing, torch.compile, DDP): a Setup."""
    say = print if rank == 0 else quiet
    for seed in (torch.manual_seed, random.seed, np.random.seed):  # dropout differs per rank
        seed(c.seed + rank)
    ptdtype = (getattr(torch, c.dtype) if c.dtype != "auto"  # auto: bf16 where the chip has it
               else torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported()
               else torch.float32)
    autocast = torch.autocast(dev.type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    hs = evals.read_hellaswag(c.hellaswag, limit=c.hellaswag_limit) if c.hellaswag else None
    tok, prep, loader, val_batches, val_bytes = load_data(c, rank, world, dev)
    hs = hs and evals.tokenize_examples(tok, hs, c.block_size)  # once; a misfit fails now
    mcfg = dataclasses.replace(  # the family from gpt.PRESETS, the size from here
        gpt.PRESETS[c.arch], n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        block_size=c.block_size, dropout=c.dropout, vocab_size=tok.vocab_size,
        pad_vocab=c.pad_vocab, kernels=c.kernels, mlp=c.mlp or gpt.PRESETS[c.arch].mlp,
        qk_norm=c.qk_norm, zero_init_proj=c.zero_init_proj, tie_embeddings=c.tie_embeddings,
        logit_softcap=c.logit_softcap)
    if dev.type != "cuda":  # CUDA says "out of memory" itself; RAM runs out in silence
        cli.fits_in_memory(gpt.train_bytes(mcfg, c.batch_size), f"a model of {c.n_layer} x {c.n_embd} with "
                           f"--batch_size={c.batch_size} --block_size={c.block_size}")
    raw = gpt.GPT(mcfg).to(dev)
    opt = optim.make_optimizer(raw, c, dev.type)
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)  # fp16 only
    step, last_ckpt, path = resume(c, mcfg, raw, opt, scaler, loader, rank, world)
    if path:
        say(f"resumed from {path} at step {step}")
    log_path = os.path.join(c.out_dir, "log.jsonl")
    if rank == 0:  # the log holds this run's history: after a resume, drop what came later
        trim_log(log_path, step if path else 0)
    model = raw
    if c.checkpointing:
        checkpoint_blocks(raw)
    if c.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    accum = c.grad_accum // world
    tokens_per_step = c.batch_size * c.block_size * accum * world
    peak_name, peak = device_peak(dev)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        ptdtype, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    s = Setup(model, raw, opt, scaler, loader, tok,
              os.path.abspath(os.path.join(prep.train, "..", "tokenizer.json")),
              val_batches, val_bytes, autocast, dev, rank, world, accum, tokens_per_step,
              raw.flops_per_token(), peak[key] * world if peak and peak[key] else None,
              log_path, step, last_ckpt, tok.special_tokens.get("<|endoftext|>"), hs, say)
    say(f"model: {raw.num_params() / 1e6:.2f}M parameters, {s.flops_per_token / 1e6:.1f} MFLOPs "
        f"per token | data: {loader.windows:,} train windows, vocab {tok.vocab_size}")
    say(f"device: {peak_name} x{world}, {str(ptdtype)[6:]}, {tokens_per_step:,} tokens per step "
        f"({c.batch_size} x {c.block_size} x {accum * world} micro-batches), {c.max_iters} steps"
        f" | preset {c.preset}, optimizer {c.optimizer}")
    return s


class Meter:
    """Tokens per second between log lines, evaluations and saves left out (paused)."""

    def __init__(self, start_step):
        self.t0 = self.t_log = time.time()
        self.start_step, self.steps = start_step, 0  # steps since the last log line

    def rate(self, tokens_per_step):
        """(tokens/s since the last call, seconds since the start); restarts the count."""
        now = time.time()
        tps = self.steps * tokens_per_step / (now - self.t_log)
        self.t_log, self.steps = now, 0
        return tps, now - self.t0

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        yield
        self.t_log += time.time() - t


def write_log(s, row):
    if s.rank == 0:
        with open(s.log_path, "a") as f:
            f.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")


def finite_or_null(row):
    """JSON has no NaN or Infinity (json.dumps would write them anyway, and no reader takes
    the file back): a value that is not finite is logged as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def trim_log(log_path, step):
    """Keep the rows of log.jsonl up to step (all of them go for a fresh run), atomically."""
    rows = cli.log_rows(log_path) if step and os.path.exists(log_path) else []
    with cli.atomic_open(log_path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step).encode())


@contextlib.contextmanager
def hold_out_dir(folder):
    """cli.hold_dir(folder) for a run (train.py's, finetune.py's); a folder it had to create
    and that stays empty (the run stopped before writing) is removed again."""
    created = not os.path.exists(folder)
    try:
        with cli.hold_dir(folder):
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty


# ----------------------------------------------------------------------------- peak FLOPs, MFU
# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets. bf16/fp16 accumulate in
# fp32; tf32 is what fp32 matmuls run at with TF32 on; None: the chip has no such unit. A key
# matches whole words of the device name, the longest match wins: "NVIDIA A100-SXM4-80GB" is
# the A100-SXM4-80GB row, "NVIDIA L40S" never the L4 row, "NVIDIA A10G" (no row) never A10.
#                      bf16    fp16    tf32   fp32   (TFLOP/s)   memory bandwidth (TB/s)
_PEAKS = {"H100":           (989.4, 989.4, 494.7, 66.9, 3.35),   # SXM
          "H100 PCIe":      (756.5, 756.5, 378.0, 51.2, 2.0),
          "H100 NVL":       (835.5, 835.5, 417.5, 60.0, 3.9),
          "H200":           (989.4, 989.4, 494.7, 66.9, 4.8),    # SXM
          "A100":           (312.0, 312.0, 156.0, 19.5, 1.555),  # 40GB
          "A100-SXM4-80GB": (312.0, 312.0, 156.0, 19.5, 2.039),
          "A100 80GB PCIe": (312.0, 312.0, 156.0, 19.5, 1.935),
          "A10":            (125.0, 125.0, 62.5, 31.2, 0.6),
          "L4":             (121.0, 121.0, 60.0, 30.3, 0.3),
          "L40S":           (362.05, 362.05, 183.0, 91.6, 0.864),
          "RTX 4090":       (165.2, 165.2, 82.6, 82.6, 1.008),
          "RTX 3090":       (71.0, 71.0, 35.6, 35.6, 0.936),
          "V100":           (None, 125.0, None, 15.7, 0.9),      # SXM2
          "T4":             (None, 65.0, None, 8.1, 0.32)}
PEAK_FLOPS = {name: {"bf16": b and b * 1e12, "fp16": h * 1e12, "tf32": t and t * 1e12,
                     "fp32": f * 1e12, "bandwidth": bw * 1e12}
              for name, (b, h, t, f, bw) in _PEAKS.items()}  # FLOP/s and bytes/s


def device_peak(device):
    """(device name, its PEAK_FLOPS entry or None) for a torch device or a device name."""
    if isinstance(device, str) and device.split(":")[0] not in ("cpu", "cuda", "mps"):
        name = device  # already a name, e.g. "NVIDIA H100 80GB HBM3"
    elif torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        return str(torch.device(device).type), None  # no table for CPUs: MFU is not shown
    words = [k for k in PEAK_FLOPS if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", name)]
    return name, PEAK_FLOPS.get(max(words, key=len, default=""))


def mfu(flops_per_token, tokens_per_s, peak_flops):
    """Model FLOPs utilization: the model's own FLOPs/s over the chip's peak. Recomputation is
    not counted, so activation checkpointing lowers MFU even though the chip is as busy."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None



# ----------------------------------------------------------------------------- presets
# GPT-2 small, 124M: 8 x 1024 tokens x 64 micro-batches = 524,288 tokens a step. Peak memory
# 7.8 GiB on an H100 (micro-batch 16: 13.4 GiB, too close to 15 GB for comfort).
GPU_16GB = dict(
    n_layer=12, n_head=12, n_embd=768, block_size=1024, tokenizer="gpt2", pad_vocab=64,
    batch_size=8, grad_accum=64, max_iters=19073, lr=6e-4, min_lr=6e-5, warmup_iters=700,
    beta2=0.95, dtype="bfloat16", compile=True, eval_interval=250, eval_iters=20,
    log_interval=10, save_interval=1000, optimizer="fused", out_dir="out/gpu-16gb")

# nanoGPT's config/train_shakespeare_char.py as run on a CPU, reproduced plainly
SHAKESPEARE_BASELINE = dict(
    tokenizer="char", n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
    batch_size=12, grad_accum=1, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
    schedule="cosine", beta2=0.99, weight_decay=0.1, sampler="random", optimizer="torch",
    dtype="float32", compile=False, eval_interval=2000, eval_iters=0, log_interval=250,
    save_interval=2000, out_dir="out/shakespeare-char-baseline")

# Named presets; the constants at the top are "cpu" (a test holds them equal, so --help is
# true). The GPU ones need --gpt2_dir (GPT-2's vocab and merges files) and, for a real run,
# --data with a few GB of text.
PRESETS_TRAIN = {
    # the plays, char-level, 4 x 128: Muon for the hidden matrices (optim.py). In the wall
    # time of 1,500 AdamW steps (189 s on 2 cores) it takes 1,180 steps (176 s) and ends at
    # val 1.54 instead of 1.71 (docs/speedrun.md)
    "cpu": dict(optimizer="muon", max_iters=1180),
    "laptop-8gb": dict(  # 11.5M parameters; peak RSS 1.5 GiB measured, BPE training included
        n_layer=6, n_head=6, n_embd=384, block_size=256, tokenizer="bpe", vocab_size=2048,
        batch_size=8, grad_accum=2, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
        dropout=0.1, eval_interval=250, save_interval=250, log_interval=10, optimizer="fused",
        out_dir="out/laptop-8gb"),
    "gpu-16gb": GPU_16GB,
    "gpu-80gb": dict(GPU_16GB, batch_size=32, grad_accum=16, out_dir="out/gpu-80gb"),  # 24.7 GiB
    "shakespeare-char-baseline": SHAKESPEARE_BASELINE,
    # ours on the same data and model size: 4x the peak lr, warmup-stable-decay to ~0,
    # every window once per epoch, fused AdamW: 1,100 steps instead of 2,000
    "shakespeare-char": dict(
        SHAKESPEARE_BASELINE, max_iters=1100, lr=4e-3, min_lr=1e-5, warmup_iters=50,
        schedule="wsd", decay_frac=0.4, sampler="epoch", optimizer="fused",
        eval_interval=1100, log_interval=100, save_interval=1100, out_dir="out/shakespeare-char"),
    # shakespeare-char plus the speedrun ideas that pay at this size (docs/speedrun.md): Muon
    # for the hidden matrices, its Newton-Schulz in float32 (bf16 matmuls are slow on a CPU)
    # and its AdamW groups fused; no warmup, 2x the AdamW lr, 1.5x Muon's, a longer decay
    # (--muon_split_qkv: 1.816 vs 1.847 at 600 steps of the old preset, docs/speedrun.md).
    # Val at 510 steps: 1.8763 (seed 1337), 1.8556 (seed 1338)
    "shakespeare-char-speedrun": dict(
        SHAKESPEARE_BASELINE, max_iters=510, lr=8e-3, min_lr=1e-5, warmup_iters=0,
        schedule="wsd", decay_frac=0.6, sampler="epoch", optimizer="muon", muon_lr=0.03,
        muon_ns_dtype="float32", muon_adamw_fused=True,
        eval_interval=510, log_interval=50, save_interval=510,
        out_dir="out/shakespeare-char-speedrun"),
}
SHAKESPEARE = ("shakespeare-char-baseline", "shakespeare-char", "shakespeare-char-speedrun")


# ----------------------------------------------------------------------------- options
TOKENIZERS = ("char", "bpe", "gpt2")
SAMPLERS = ("epoch", "random")
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("ours", "torch", "fused", "muon")
KERNELS = ("torch", "triton")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NS_DTYPES = ("bfloat16", "float32")


def make_config(**overrides):
    """The hyperparameters as one object, for Python callers: the constants above, then the
    preset named by overrides["preset"] (default: the `preset` constant), then the overrides
    themselves: make_config(n_layer=2).n_layer == 2. (The command line has cli apply the
    preset, then calls config.)"""
    c = cli.hyperparameters(globals())
    unknown = sorted(set(overrides) - set(c))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}")
    name = cli.one_of("preset", overrides.get("preset", c["preset"]), list(PRESETS_TRAIN))
    return config({**c, **PRESETS_TRAIN[name], **overrides})


def config(values):
    """A complete set of hyperparameters, checked (each of the constants' type, then every
    range), as a Config object: config({... "lr": "1e-3" ...}) is a ValueError naming lr."""
    defaults = cli.hyperparameters(globals())
    for k, v in values.items():
        want = type(defaults[k])
        if not (type(v) is want or want is float and type(v) is int):
            raise ValueError(f"{k}={v!r}: must be of type {want.__name__} "
                             f"(the constant is {k} = {defaults[k]!r})")
    c = dataclasses.make_dataclass("Config", list(values))(**values)
    check_options(c)
    return c


def check_options(c):
    """Every option's range, before any work: the first bad one is one ValueError."""
    for what, value, names in (("preset", c.preset, PRESETS_TRAIN), ("arch", c.arch, gpt.PRESETS),
                               ("sampler", c.sampler, SAMPLERS), ("schedule", c.schedule, SCHEDULES),
                               ("optimizer", c.optimizer, OPTIMIZERS), ("dtype", c.dtype, DTYPES),
                               ("kernels", c.kernels, KERNELS),
                               ("device", c.device.split(":")[0], DEVICES)):
        cli.one_of(what, value, list(names))
    v = vars(c)
    rules = [(n, v[n] >= 1, "at least 1") for n in (
        "n_layer", "n_head", "n_embd", "block_size", "pad_vocab", "batch_size", "grad_accum",
        "log_interval", "eval_interval", "save_interval", "keep_checkpoints")]
    rules += [(n, v[n] >= 0, ">= 0") for n in (
        "max_iters", "warmup_iters", "lr", "min_lr", "weight_decay", "grad_clip",
        "eval_iters", "sample_tokens", "seed", "hellaswag_every", "hellaswag_limit")]
    cli.check(v, rules)  # each range first: the rules below divide by n_head
    cli.check(v, [
        ("n_embd", c.n_embd % c.n_head == 0, f"a multiple of --n_head={c.n_head}"),
        ("threads", 0 <= c.threads <= cli.MAX_THREADS, f"in [0, {cli.MAX_THREADS}] (0: torch's choice)"),
        ("vocab_size", 257 <= c.vocab_size <= 2**20, "in [257, 2**20] (256 bytes, then merges)"),
        ("val_frac", 0 < c.val_frac < 1, "between 0 and 1"),
        ("dropout", 0 <= c.dropout < 1, "in [0, 1)"),
        ("mlp", c.mlp in ("",) + gpt.GPTConfig.CHOICES["mlp"],
         "'' (the arch's) or one of " + ", ".join(gpt.GPTConfig.CHOICES["mlp"])),
        ("logit_softcap", c.logit_softcap >= 0, ">= 0 (0 = off)"),
        ("muon_lr", c.muon_lr > 0, "> 0"), ("muon_momentum", 0 <= c.muon_momentum < 1, "in [0, 1)"),
        ("muon_weight_decay", c.muon_weight_decay >= 0, ">= 0"),
        ("muon_ns_dtype", c.muon_ns_dtype in NS_DTYPES, "one of " + ", ".join(NS_DTYPES)),
        ("muon_ns_steps", c.muon_ns_steps >= 1, "at least 1"),
        ("decay_frac", 0 <= c.decay_frac <= 1, "in [0, 1]"),
        ("beta1", 0 <= c.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= c.beta2 < 1, "in [0, 1)"),
        ("seed", c.seed < 2**32 - 2**16, "below 2**32 - 2**16 (numpy seeds, one per process)"),
        ("tokenizer", c.tokenizer in TOKENIZERS or os.path.isfile(c.tokenizer),
         "char, bpe, gpt2 or the path of a saved tokenizer"),
        ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", c.device) is not None,
         "auto, cpu, cuda, cuda:N or mps"),
        ("hellaswag_every", not c.hellaswag_every or c.hellaswag,
         "0 without --hellaswag=PATH (it says how often to score that file)"),
        ("out_dir", c.out_dir != "", "a folder"),
        ("data_dir", c.data_dir != "", "a folder"),
        ("init", c.init != "", "auto, scratch or the path of a checkpoint")])


# ----------------------------------------------------------------------------- setup helpers
def load_data(c, rank, world, dev):
    """Tokenizer, train loader (this rank's share) and the fixed val batches."""
    if c.preset in SHAKESPEARE and not c.data:
        raise ValueError(f"preset {c.preset} needs --data=PATH/tinyshakespeare.txt")
    # GPT-2's 50,257 ids, in our format; a prepared folder as --data brings its own tokenizer
    tok_name = (c.tokenizer if c.tokenizer != "gpt2" or is_prepared(c.data) else
                gpt2_tokenizer_file(c.gpt2_dir, os.path.join(c.data_dir, "gpt2-tokenizer.json")))
    args = dict(data=c.data, tokenizer=tok_name, vocab_size=c.vocab_size, out_dir=c.data_dir,
                val_fraction=c.val_frac, seed=c.seed)
    prep, error = None, [None]
    # the others wait for rank 0 in a CPU group of their own whose timeout fits a long
    # prepare: in the training group, NCCL's 10-minute default would kill them
    waiting = (dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=PREPARE_HOURS))
               if world > 1 else None)
    if rank == 0:  # one process tokenizes; the others wait, then reuse its shards
        try:
            prep = prepare(**args)
        except (ValueError, OSError) as e:
            error = [e]
    if world > 1:  # rank 0's error, if any, reaches every process (none is left waiting)
        dist.broadcast_object_list(error, src=0, group=waiting)
        dist.destroy_process_group(waiting)
    if error[0] is not None:
        raise error[0]
    prep = prep or prepare(**args)
    train_loader = DataLoader(prep.train, c.batch_size, c.block_size, rank, world, c.sampler,
                              c.seed, dev)
    if c.batch_size * world > train_loader.windows:
        raise ValueError(f"a batch of {c.batch_size * world} sequences is more than the "
                         f"{train_loader.windows} windows of {c.block_size} tokens in "
                         f"{prep.train}; use a smaller --batch_size or --block_size, or more data")
    # val: a fixed set of windows, the same at every evaluation (and for every batch size)
    windows = DataLoader(prep.val, 1, c.block_size).windows
    n = windows if c.eval_iters == 0 else min(windows, c.eval_iters * c.batch_size)
    x, y = DataLoader(prep.val, n, c.block_size, sampler="epoch", seed=c.seed).next_batch()
    val_batches = list(zip(x.to(dev).split(c.batch_size), y.to(dev).split(c.batch_size)))
    # bits per byte: each target token's length in UTF-8 bytes (special tokens count 0)
    tok = prep.tokenizer
    special = set(tok.special_tokens.values())
    nbytes = torch.tensor([0 if i in special else len(tok.decode_bytes([i]))
                           for i in range(tok.vocab_size)])
    val_bytes = nbytes[y].sum().item()
    return tok, prep, train_loader, val_batches, val_bytes


def gpt2_tokenizer_file(folder, path):
    """GPT-2's tokenizer in our format, saved at path once from the vocab and merges files in
    folder (named as Hugging Face's vocab.json / merges.txt, or gpt2_vocab.json / ...)."""
    if not os.path.exists(path):
        files = [[os.path.join(folder, p + n) for p in ("", "gpt2_")
                  if os.path.isfile(os.path.join(folder, p + n))]
                 for n in ("vocab.json", "merges.txt")]
        if not all(files):
            raise FileNotFoundError(f"tokenizer='gpt2' needs --gpt2_dir=FOLDER holding GPT-2's "
                                    f"vocab.json and merges.txt; got {folder!r}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        bpe.Tokenizer.from_gpt2_files(files[0][0], files[1][0]).save(path)
    return path


@contextlib.contextmanager
def catch_signals():
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to save and stop after this step: yields
    the list that receives the signal number. A second Ctrl-C quits at once."""
    got = []

    def handler(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(signum)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              "(Ctrl-C again to quit now)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
           if threading.current_thread() is threading.main_thread()}  # only it may set them
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def checkpoint_blocks(model):
    """Activation checkpointing: keep only each block's input, recompute the rest in backward:
    most of the activation memory saved for about one more forward pass of compute."""
    from block import Block
    for blk in (m for m in model.modules() if isinstance(m, Block)):
        def forward(x, cache=None, _f=blk.forward):
            if cache is not None or not torch.is_grad_enabled():
                return _f(x, cache)
            return torch.utils.checkpoint.checkpoint(_f, x, use_reentrant=False)
        blk.forward = forward


def peak_memory(dev):
    """Peak bytes this process held: CUDA allocations on a GPU, resident memory on a CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    if sys.platform == "win32":
        return None
    import resource
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    """The command line, python train.py --name=value ...; main(["--max_iters=10"]) from Python.
    cli.run turns errors into one line: exit 2 for a bad option, 1 for a rejected value, a bad
    file, a full disk or a non-finite loss, 130 for Ctrl-C before the loop. A signal inside the
    loop saves a checkpoint first, then exits 128 + its number."""
    options = cli.hyperparameters(globals())  # a copy: the module's constants stay as they are
    cli.run(functools.partial(command, options), options, presets=PRESETS_TRAIN, argv=argv,
            errors=(ValueError, OSError, ImportError, FloatingPointError), source=__file__)


def command(options):
    try:
        result = train(config(options))
    except torch.OutOfMemoryError:
        raise ValueError("out of memory: lower --batch_size (and raise --grad_accum to keep the "
                         "tokens per step), or set --checkpointing=true") from None
    if result["interrupted"]:
        print(f"stopped by {signal.Signals(result['interrupted']).name} at step {result['step']}; "
              f"saved {result['checkpoint']}; run the same command to resume", file=sys.stderr)
        raise SystemExit(128 + result["interrupted"])


if __name__ == "__main__":
    main()
