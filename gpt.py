"""gpt.py - the whole model: embeddings, a stack of blocks, a tied LM head; training demo.

What you will learn
  * how token ids become logits: token embedding (+ learned positions, or RoPE inside the
    blocks), n_layer blocks from block.py, a final norm, and an LM head that reuses the
    embedding matrix (weight tying);
  * GPT-2's initialisation (std 0.02, residual projections scaled by 1/sqrt(2 * n_layer));
  * speedrun options (docs/speedrun.md): an untied head, logit soft-capping, and block.py's
    relu2 / qk_norm / zero_init_proj;
  * counting parameters and FLOPs per token (6N + the attention term);
  * sampling: temperature, top-k, top-p, a KV cache, stopping at end-of-text;
  * reading and writing Hugging Face checkpoints: GPT-2 (Conv1D weights are transposed) and
    Llama (separate q/k/v, GQA, RoPE in the rotate_half layout).

Run it
  python gpt.py                          # tokenizer + data + train "tiny" + sample, < 5 min
  python gpt.py --max_iters=50 --out_dir=/tmp/demo
  python gpt.py --time_limit=0           # all max_iters steps, however long they take

What it writes (under --out_dir, default ./out)
  data/...           bpe vocabulary + token shards (dataloader.prepare; reused on the next run)
  gpt_tiny.pt        the checkpoint: {"model": state_dict, "config": asdict(GPTConfig),
                     "tokenizer": "tokenizer.json" (next to it), "iter": steps trained},
                     "format": FORMAT, written atomically; load_checkpoint(path) reads it
                     with weights_only=True
  tokenizer.json     the bpe vocabulary (dataloader.load_tokenizer reads it)
  gpt_tiny.log.jsonl the loss log, one JSON row a line: {"step", "loss"} (step 1, then every
                     25) and {"step", "val_loss"} (every eval_interval, and at the end)
  gpt_tiny.png       the loss curve, train and val, drawn from that log (cli.plot_log)
  .lock              while a run holds the folder (cli.hold_dir): a second run at once refuses
A run whose loss or weights stop being finite ends with one line and writes nothing.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import json
import math
import numbers
import os
import re
import time
import typing
import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import block
import corpora
import dataloader
from block import (Block, BlockConfig, check_fields, make_norm, matmul_params,
                   zero_projections)

# demo hyperparameters (python gpt.py --name=value)
out_dir = "out"          # everything the demo writes goes under here
preset = "tiny"
vocab_size = 512         # bpe vocabulary trained on the built-in corpus
batch_size = 16
block_size = 128
max_iters = 1500
time_limit = 200.0       # seconds for data preparation + training at most; 0 = no limit
lr = 3e-3
weight_decay = 0.1
eval_iters = 20          # val batches per val loss
eval_interval = 250      # steps between val losses (the loss curve's val points; and at the end)
num_samples = 2
sample_tokens = 200
temperature = 0.8
top_k = 0                # 0 = off
top_p = 0.95
seed = 1337
device = "cpu"           # "cpu", "cuda", "mps" or "auto" (the best one here)
threads = 0              # torch threads; 0 = torch's default


@dataclass
class GPTConfig(BlockConfig):
    """BlockConfig's fields (n_embd, n_head, n_kv_head, norm, mlp, pos, ...) plus these."""
    n_layer: int = 4
    vocab_size: int = 512
    pad_vocab: int = 64        # embedding rows rounded up to a multiple (fast matmuls)
    tie_embeddings: bool = True   # LM head = token embedding matrix; False: a head of its own
    logit_softcap: float = 0.0    # C > 0: logits = C * tanh(logits / C), |logit| < C; 0 = off

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, ints={"n_layer": 0, "vocab_size": 1, "pad_vocab": 1},
                     floats={"logit_softcap": (0, True)}, bools=("tie_embeddings",))

    @property
    def padded_vocab(self):
        return self.pad_vocab * math.ceil(self.vocab_size / self.pad_vocab)


PRESETS = {
    # the CPU demo: ~1M parameters
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=512),
    # ~10M: trains on a laptop within 8 GB
    "laptop": GPTConfig(n_layer=8, n_head=5, n_embd=320, block_size=256, vocab_size=2048),
    # GPT-2 small, 124M (its vocabulary of 50,257 is padded to 50,304 inside the model)
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    # the same block in Llama's style, ~10M: RMSNorm, SwiGLU, RoPE, GQA, no biases
    "llama": GPTConfig(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256,
                       vocab_size=2048, bias=False, norm="rmsnorm", norm_eps=1e-6,
                       mlp="swiglu", pos="rope"),
}


def get_config(name, **overrides):
    return replace(PRESETS[cli.one_of("preset", name, list(PRESETS))], **overrides)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.padded_vocab, c.n_embd)           # token -> vector
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = make_norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab, bias=False)  # vector -> logits
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream; scale them so the
        # stream's variance does not grow with depth (zero_init_proj: start them at 0)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
        if c.zero_init_proj:
            for block in self.h:
                zero_projections(block)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def hidden(self, idx, cache=None):
        """Token ids (B, T) -> final normalised hidden states (B, T, C)."""
        B, T = idx.shape
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            lo, hi = idx.min().item(), idx.max().item()  # cheap next to the model; on a GPU it
            if lo < 0 or hi >= self.config.vocab_size:  # would stall the pipeline: not there
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                                 f"(0..{self.config.vocab_size - 1})")
        start = cache[0].n if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than "
                             f"block_size={self.config.block_size}")
        x = self.wte(idx)                                          # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache is not None else None)
        return self.ln_f(x)

    def head(self, x):
        """Hidden states (..., C) -> logits (..., vocab_size); the padding rows are cut off.
        logit_softcap C squashes them smoothly into (-C, C): no logit can run away, and the
        gradient fades (tanh' -> 0) instead of being clipped."""
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        C = self.config.logit_softcap
        return C * torch.tanh(logits / C) if C else logits

    def forward(self, idx, targets=None, cache=None):
        """idx, targets: (B, T) int64 -> logits (B, T, vocab_size), mean cross-entropy or None.
        Targets equal to -1 are ignored. kernels="triton" while training: logits is None."""
        logits = self.head(self.hidden(idx, cache))
        loss = None
        if targets is not None and self.config.kernels == "triton":
            # fused: in training the gradient overwrites the logits, so none are returned
            inplace = torch.is_grad_enabled() and logits.requires_grad
            loss = block.triton_kernels().cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), -1, inplace)
            logits = None if inplace else logits
        elif targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def new_cache(self, batch_size, max_len=None):
        """One KVCache per layer, for up to max_len positions (default block_size)."""
        return [block.new_cache(batch_size, max_len) for block in self.h]

    # ------------------------------------------------------------------ accounting
    def num_params(self):
        """Parameters, each shared tensor once, without the vocabulary padding rows (they
        never get a logit or a gradient): "gpt2" gives Hugging Face's 124,439,808."""
        c = self.config
        pad_rows = c.padded_vocab - c.vocab_size  # in wte, and in an untied lm_head too
        n = sum(p.numel() for p in self.parameters())
        return n - pad_rows * c.n_embd * (1 if c.tie_embeddings else 2)

    def flops_per_token(self, T=None):
        """Forward + backward FLOPs per token at sequence length T (default block_size):
        6 * N + 12 * n_layer * T * C, N = weights that take part in a matmul (all Linear
        layers and the LM head, padding rows included since they are computed)."""
        c = self.config
        T = T or c.block_size
        n = sum(matmul_params(b) for b in self.h) + self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * T * c.n_embd

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eot_id=None, seed=None, use_cache=True):
        """Continue idx ((B, T) or (T,) token ids) by up to max_new_tokens tokens.

        temperature 0 = greedy; top_k keeps the k likeliest tokens; top_p keeps the smallest
        set whose probability reaches top_p; a row stops at eot_id (then repeats it), the loop
        when every row has stopped. seed makes it repeatable. With use_cache the prompt is
        processed once and each step feeds one token; the tokens are the same as without.
        """
        check_sampling(temperature, top_k, top_p)
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        V = self.config.vocab_size
        if eot_id is not None and not (isinstance(eot_id, numbers.Integral) and 0 <= eot_id < V):
            raise ValueError(f"eot_id must be a token id in [0, {V}), got {eot_id!r}")
        dev = self.wte.weight.device
        idx = torch.as_tensor(idx, dtype=torch.long, device=dev)
        idx = idx[None] if idx.dim() == 1 else idx
        bs = self.config.block_size
        if idx.size(1) == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if idx.size(1) > bs:
            warnings.warn(f"prompt has {idx.size(1)} tokens, more than block_size={bs}: "
                          f"the model sees only the last {bs}", stacklevel=2)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= bs:   # the whole sequence fits: reuse keys/values
                if cache is None:
                    cache = self.new_cache(idx.size(0), min(bs, idx.size(1) + max_new_tokens))
                    x = self.hidden(idx, cache)        # the prompt, once
                else:
                    x = self.hidden(idx[:, -1:], cache)  # one new token
            else:  # past the context every position shifts, so recompute the window
                x = self.hidden(idx[:, -bs:])
            logits = self.head(x[:, -1])                # (B, vocab)
            nxt = sample(logits, temperature, top_k, top_p, gen)
            if eot_id is not None:
                nxt = torch.where(done, eot_id, nxt)
                done |= nxt == eot_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if eot_id is not None and done.all():
                break
        self.train(was_training)
        return idx

    # ------------------------------------------------------------------ interop
    @classmethod
    def from_hf(cls, hf_model):
        """Our model from a transformers GPT2LMHeadModel or LlamaForCausalLM (any object with
        .config and .state_dict())."""
        config = config_from_hf(hf_model.config)
        model = cls(config)
        model.load_weights(from_hf_state_dict(hf_model.state_dict(), config))
        return model

    @classmethod
    def from_pretrained(cls, name="gpt2"):
        """Download Hugging Face weights (needs internet and transformers): "gpt2", "gpt2-medium",
        or a Llama-architecture checkpoint name."""
        from transformers import AutoModelForCausalLM  # only here: an optional extra
        return cls.from_hf(AutoModelForCausalLM.from_pretrained(name))

    def to_hf(self):
        """State dict in transformers' naming for GPT2LMHeadModel or LlamaForCausalLM
        (see hf_config_kwargs for the matching config)."""
        return to_hf_state_dict(self.state_dict(), self.config)

    def load_weights(self, state_dict):
        """load_state_dict that names missing/unexpected keys and wrong shapes in a ValueError."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the model: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state_dict.items()
                 if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"state dict shapes do not fit the model: {', '.join(wrong)}")
        self.load_state_dict(state_dict)


def check_sampling(temperature, top_k, top_p):
    """A ValueError naming the argument for settings that would sample garbage or fail deep
    inside torch (a nan temperature, top_k=0 keeps nothing, top_p=0 too)."""
    if not _real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool)
                              or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (None = off), got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V). -inf is a masked token; nan or +inf means the
    model is broken (a diverged run): an error, not a random or a silent argmax pick."""
    if not (logits < math.inf).all():  # False for nan and +inf alike
        raise ValueError("the logits are not finite (nan or inf): the model's weights are "
                         "broken, e.g. by a diverged training run")
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(truncate(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def truncate(logits, top_k=None, top_p=None):
    """logits (B, V) with -inf outside the top_k likeliest tokens, then outside the smallest
    set whose probability reaches top_p (the nucleus)."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = F.softmax(sorted_logits, dim=-1)
        # drop a token once the likelier ones already reach top_p (the first always stays)
        drop = p.cumsum(-1) - p >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# ----------------------------------------------------------------------------- training helpers
# used by the demo below and by train.py (and finetune.py through it)
def param_groups(model, weight_decay):
    """Decay the matrices that multiply activations, not norms, biases or embeddings: a gain or
    bias has no reason to shrink, and an embedding row (and a head tied to it) only sees a
    gradient when its token appears, so decay would erase rare tokens."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied weight is listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(step, lr, min_lr, warmup_iters, max_iters, schedule="cosine", decay_frac=0.2):
    """Learning rate for step 0, 1, ... max_iters-1. Warmup ramps up linearly, so the first
    updates (a random model, Adam's moments still noisy) are small. Then "cosine" glides from lr
    to min_lr along half a cosine; "wsd" holds lr (the stable phase) and decays linearly over
    the last decay_frac of the run, so a run can be extended from any stable-phase checkpoint:
    each of those D steps takes a smaller lr, and the last step (max_iters - 1) takes min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if schedule == "cosine":
        progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)
    if schedule == "wsd":
        decay_iters = round(decay_frac * max_iters)
        if decay_iters == 0:  # decay_frac=0: no decay
            return lr
        # + 1: the decay's D steps are max_iters - D ... max_iters - 1; the last is at 1
        progress = (step + 1 - (max_iters - decay_iters)) / decay_iters
        return lr + min(max(progress, 0.0), 1.0) * (min_lr - lr)
    raise ValueError(f"schedule={schedule!r}; expected 'cosine' or 'wsd'")


def train_bytes(config, batch_size):
    """Bytes one float32 training step needs, estimated before allocating anything: 4 copies of
    every parameter (weights, gradients, AdamW's two moments) and, per token, what autograd
    keeps for backward: ~10 C + 2 hidden (3 for SwiGLU) per layer, 2 (T, T) score rows per
    head for the readable attention, the logits three times, and one transient score matrix.
    test_all checks it against the bytes saved for backward, counted with hooks."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        n = sum(p.numel() for p in GPT(config).parameters())
    c = config
    per_token = c.n_layer * (10 * c.n_embd + (3 if c.mlp == "swiglu" else 2) * c.hidden
                             + (0 if c.sdpa else 2) * c.n_head * c.block_size)
    per_token += 2 * c.n_embd + 3 * c.padded_vocab + c.n_head * c.block_size
    return 4 * (4 * n + batch_size * c.block_size * per_token)


def pick_device(name):
    """torch.device for "cpu", "cuda", "cuda:N", "mps" or "auto" (CUDA, else MPS, else CPU);
    one that does not exist here is a clear error now, not an assertion deep inside torch."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    dev = torch.device(name) if re.fullmatch(r"cpu|mps|cuda(:\d+)?", name) else None
    if dev is None:
        raise ValueError(f"--device={name!r}: expected cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count() \
            or dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device={name}: {dev.type.upper()} is not available here (torch "
                         f"{torch.__version__}, {torch.cuda.device_count()} CUDA devices)")
    return dev


# ----------------------------------------------------------------------------- checkpoints
# One layout for every model file nanollm writes (gpt.py's demo, train.py's runs, finetune.py):
#     {"format": FORMAT, "config": asdict(GPTConfig), "model": state_dict, **extras}
# gpt.py's extras: "tokenizer" (a path, relative to the file) and "iter"; train.py's run adds
# what an exact resume needs (step, optimizer, RNGs, data position: train.save_run). One writer
# (save_checkpoint) and one reader (read_checkpoint) serve all three files.
FORMAT = "nanollm-2"  # version 1: gpt.py's files had no format, train.py's said "nanollm-train-1"


def save_checkpoint(path, model, **extra):
    """Write {"format", "config", "model", **extra} to path atomically (a temp file beside it,
    then os.replace: a crash never leaves half a checkpoint). A model with a nan or inf weight
    is refused before anything is written: a diverged run must not replace a good file."""
    state = model.state_dict()
    bad = next((k for k, v in state.items()
                if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path} not written: the weight {bad} is not finite (the model diverged)")
    with cli.atomic_open(path) as f:
        torch.save({"format": FORMAT, "config": asdict(model.config), "model": state, **extra}, f)


def read_checkpoint(path, keys=()):
    """The one reader: the dict in a file save_checkpoint wrote, loaded onto the CPU (no GPU
    memory spike) with weights_only=True (tensors and plain containers, never code). A missing,
    truncated or foreign file, a missing key in ("config", "model", *keys), a config whose fields
    have the wrong names, types or ranges, or weights that are not named tensors: one
    ValueError naming the file (FileNotFoundError if there is none)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle with code in it
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path} is not a nanollm checkpoint (format is not {FORMAT!r})")
    missing = [k for k in ("config", "model", *keys) if k not in ck]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint (no {', '.join(missing)})")
    model = ck["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise ValueError(f"{path}: \"model\" is not a dict of named tensors")
    odd = next((k for k, v in model.items() if not v.is_floating_point()), None)  # bool, int, complex
    if odd is not None:
        raise ValueError(f"{path}: the weight {odd} holds {model[odd].dtype}, not real floating-point numbers")
    bad = next((k for k, v in model.items() if not torch.isfinite(v).all()), None)
    if bad is not None:  # save_checkpoint never writes one: scoring or chatting with it is garbage
        raise ValueError(f"{path}: the weight {bad} is not finite (nan or inf): the model diverged")
    checkpoint_config(path, ck["config"])
    return ck


def _of_type(value, kind):
    """Whether value has the dataclass field type kind (int, float, str, bool, int | None);
    bool is not an int here, an int is a float."""
    kinds = typing.get_args(kind) or (kind,)
    return any(type(value) is k or (k is float and type(value) is int) for k in kinds)


def checkpoint_config(path, saved):
    """GPTConfig from a checkpoint's "config" dict, every field checked (name, type, range)
    before any memory is allocated for it; errors name the file and the field."""
    kinds = {f.name: f.type for f in fields(GPTConfig)}
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: \"config\" is not a dict")
    for k, v in saved.items():
        if k not in kinds:
            raise ValueError(f"{path}: config has an unknown field {k!r}")
        if not _of_type(v, kinds[k]):
            raise ValueError(f"{path}: config field {k}={v!r} is not {kinds[k]}")
    positive = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab",
                "n_kv_head", "n_hidden", "norm_eps", "rope_theta")
    bad = [k for k, v in saved.items() if k in positive and v is not None and v <= 0]
    bad += [k for k in ("dropout",) if k in saved and not 0 <= saved[k] < 1]
    if bad:
        raise ValueError(f"{path}: config field {bad[0]}={saved[bad[0]]!r} is out of range")
    try:  # the kernels are a run-time choice: a file always loads on the torch path
        return GPTConfig(**{**saved, "kernels": "torch"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config ({e})") from None


def config_fits_weights(path, config, weights):
    """Refuse a config that its weights contradict, before a model is built from it: a file
    claiming n_layer=10**6 or n_embd=2**40 would build for minutes, or overflow, before the shape
    check. The layer count and the embedding's shape are read off the weights; the memory the
    model needs (as much as the weights again) is checked against the machine's."""
    layers = len({k.split(".")[1] for k in weights if k.startswith("h.")})
    wte = weights.get("wte.weight")
    shape = tuple(wte.shape) if wte is not None else None
    if layers != config.n_layer or shape != (config.padded_vocab, config.n_embd):
        raise ValueError(f"{path}: the weights do not fit its config (n_layer={config.n_layer}, "
                         f"n_embd={config.n_embd}, vocabulary {config.padded_vocab}; the weights have "
                         f"{layers} layers, wte {shape})")
    cli.fits_in_memory(sum(v.numel() * v.element_size() for v in weights.values()), f"{path}: its model")


def load_weights_from(model, path, ck):
    """model.load_weights(ck["model"]) with the file named in any mismatch."""
    try:
        model.load_weights(ck["model"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a file written by save_checkpoint. The model is built on
    the meta device first (no memory) so a config that does not fit the weights costs nothing."""
    ck = read_checkpoint(path)
    config = checkpoint_config(path, ck["config"])
    config_fits_weights(path, config, ck["model"])  # before GPT(config): n_layer=10**6 takes minutes
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    wrong = [k for k, v in ck["model"].items() if k in shapes and v.shape != shapes[k]]
    if wrong or set(shapes) != set(ck["model"]):
        raise ValueError(f"{path}: the weights do not fit its config ("
                         + (f"{wrong[0]} is {tuple(ck['model'][wrong[0]].shape)}, the config "
                            f"makes {tuple(shapes[wrong[0]])})" if wrong else
                            f"names differ: {sorted(set(shapes) ^ set(ck['model']))[:3]})"))
    return load_weights_from(GPT(config), path, ck).to(device), ck


def load_model(path, tok_path="", device="cpu"):
    """(model, tokenizer, checkpoint dict) from any nanollm checkpoint (gpt.py's, train.py's,
    finetune.py's: one layout). The tokenizer is the file the checkpoint names (relative to the
    checkpoint's folder, or absolute), unless tok_path is given; its vocabulary must be the
    model's. What finetune.py, chat.py and evals.py start from."""
    model, ck = load_checkpoint(path, device)
    saved = ck.get("tokenizer")
    if not tok_path and not isinstance(saved, str):
        raise ValueError(f"{path} names no tokenizer file (pass --tokenizer=PATH)" if saved is None
                         else f"{path}: tokenizer must be a path (a string), not {saved!r}")
    if not tok_path:
        tok_path = os.path.join(os.path.dirname(path), saved)
        if not os.path.isfile(tok_path):  # name where the path came from: that is the fix
            raise FileNotFoundError(f"{path} names the tokenizer {tok_path!r}, which does not "
                                    "exist; pass --tokenizer=PATH")
    elif not os.path.isfile(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}")
    tok = dataloader.load_tokenizer(tok_path)
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"vocabulary mismatch: {path} has {model.config.vocab_size} token ids, "
                         f"its tokenizer {tok_path} has {tok.vocab_size}")
    return model.eval(), tok, ck


# ----------------------------------------------------------------------------- Hugging Face
# Name maps between our state dict and transformers'. GPT-2's Conv1D stores weights as
# (in, out), the transpose of nn.Linear. Llama keeps q, k, v apart (we fuse them in c_attn),
# calls the SwiGLU matrices gate/up/down, and already uses the rotate_half RoPE layout.

def hf_arch(config):
    """Which transformers architecture has the same math as config: "gpt2" or "llama"."""
    extras = [f"{k}={getattr(config, k)}" for k in ("qk_norm", "logit_softcap")
              if getattr(config, k)]  # zero_init_proj is only an init: exportable
    if extras:
        raise ValueError(f"transformers' GPT-2 and Llama cannot express {', '.join(extras)}; "
                         "this model has no Hugging Face equivalent")
    if (config.norm, config.mlp, config.pos) == ("layernorm", "gelu", "learned") and config.bias \
            and config.kv_heads == config.n_head:
        return "gpt2"
    if (config.norm, config.mlp, config.pos) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ValueError(f"no transformers architecture matches norm={config.norm}, mlp={config.mlp}, "
                     f"pos={config.pos}, bias={config.bias}, n_kv_head={config.n_kv_head}")


def config_from_hf(hf):
    """GPTConfig from a transformers GPT2Config or LlamaConfig (read by attribute)."""
    if hf.model_type == "gpt2":
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh") \
                or hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
            raise ValueError("GPT-2 config variant not supported (activation or attention scaling)")
        return GPTConfig(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd,
                         n_hidden=hf.n_inner, block_size=hf.n_positions,
                         vocab_size=hf.vocab_size, norm_eps=hf.layer_norm_epsilon,
                         tie_embeddings=hf.tie_word_embeddings)
    if hf.model_type == "llama":
        rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if rope.get("rope_type", "default") != "default" or hf.hidden_act != "silu" \
                or hf.attention_bias != hf.mlp_bias \
                or head_dim * hf.num_attention_heads != hf.hidden_size:
            raise ValueError("Llama config variant not supported (rope scaling, activation, "
                             "mixed biases or a head_dim that is not hidden_size / heads)")
        return GPTConfig(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                         n_kv_head=hf.num_key_value_heads, n_embd=hf.hidden_size,
                         n_hidden=hf.intermediate_size, block_size=hf.max_position_embeddings,
                         vocab_size=hf.vocab_size, bias=hf.attention_bias, norm="rmsnorm",
                         norm_eps=hf.rms_norm_eps, mlp="swiglu", pos="rope",
                         rope_theta=rope["rope_theta"], tie_embeddings=hf.tie_word_embeddings)
    raise ValueError(f"unsupported transformers model_type {hf.model_type!r} (gpt2 or llama)")


def hf_config_kwargs(config):
    """Keyword arguments for transformers' GPT2Config or LlamaConfig (per hf_arch)."""
    c = config
    if hf_arch(c) == "gpt2":
        return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                    n_layer=c.n_layer, n_head=c.n_head, n_inner=c.hidden,
                    activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                    tie_word_embeddings=c.tie_embeddings)
    return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.hidden,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                num_key_value_heads=c.kv_heads, max_position_embeddings=c.block_size,
                rms_norm_eps=c.norm_eps, hidden_act="silu", attention_bias=c.bias,
                mlp_bias=c.bias, attention_dropout=c.dropout,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                tie_word_embeddings=c.tie_embeddings)


def _layer_names(config, i):
    """(ours, theirs, transpose) for every per-layer tensor that maps one to one."""
    if hf_arch(config) == "gpt2":
        p = f"transformer.h.{i}."
        rows = [(n, n, False) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                         "attn.c_attn.bias", "attn.c_proj.bias",
                                         "mlp.c_fc.bias", "mlp.c_proj.bias")]
        rows += [(n, n, True) for n in ("attn.c_attn.weight", "attn.c_proj.weight",
                                         "mlp.c_fc.weight", "mlp.c_proj.weight")]
        return [(f"h.{i}.{a}", p + b, t) for a, b, t in rows]
    p = f"model.layers.{i}."
    rows = [("ln_1.weight", "input_layernorm.weight"),
            ("ln_2.weight", "post_attention_layernorm.weight")]
    pairs = [("attn.c_proj", "self_attn.o_proj"), ("mlp.c_gate", "mlp.gate_proj"),
             ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")]
    for ours, theirs in pairs:
        rows += [(ours + ".weight", theirs + ".weight")]
        rows += [(ours + ".bias", theirs + ".bias")] if config.bias else []
    return [(f"h.{i}.{a}", p + b, False) for a, b in rows]


def _top_names(config):
    """(ours, theirs) for the embeddings and the final norm."""
    if hf_arch(config) == "gpt2":
        return [("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
                ("ln_f.weight", "transformer.ln_f.weight"), ("ln_f.bias", "transformer.ln_f.bias")]
    return [("wte.weight", "model.embed_tokens.weight"), ("ln_f.weight", "model.norm.weight")]


def from_hf_state_dict(sd, config):
    """A transformers GPT2LMHeadModel / LlamaForCausalLM state dict -> ours, for config.
    Missing or unexpected keys are named in a ValueError."""
    ignored = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # old buffers
    sd = {k: v for k, v in sd.items() if not k.endswith(ignored)}
    missing, out = [], {}

    def take(key):
        if key not in sd:
            missing.append(key)
        return sd.pop(key, None)

    for ours, theirs in _top_names(config):
        out[ours] = take(theirs)
    for i in range(config.n_layer):
        for ours, theirs, transpose in _layer_names(config, i):
            t = take(theirs)
            out[ours] = t.t() if transpose and t is not None else t
        if hf_arch(config) == "llama":  # fuse q, k, v into one matmul
            for kind in ("weight", "bias") if config.bias else ("weight",):
                qkv = [take(f"model.layers.{i}.self_attn.{n}_proj.{kind}") for n in "qkv"]
                out[f"h.{i}.attn.c_attn.{kind}"] = None if None in qkv else torch.cat(qkv)
    head = sd.pop("lm_head.weight", None) if config.tie_embeddings else take("lm_head.weight")
    if missing or sd:
        raise ValueError(f"transformers state dict does not fit: missing keys {missing}, "
                         f"unexpected keys {sorted(sd)}")
    out["lm_head.weight"] = out["wte.weight"] if config.tie_embeddings else head
    pad = config.padded_vocab - config.vocab_size  # zero rows: never produce a logit we keep
    for k in ("wte.weight", "lm_head.weight"):
        out[k] = F.pad(out[k], (0, 0, 0, pad))
    return out


def to_hf_state_dict(sd, config):
    """Our state dict -> transformers' naming (GPT2LMHeadModel or LlamaForCausalLM)."""
    V, out = config.vocab_size, {}
    for ours, theirs in _top_names(config):
        out[theirs] = sd[ours][:V] if ours == "wte.weight" else sd[ours]
    for i in range(config.n_layer):
        for ours, theirs, transpose in _layer_names(config, i):
            out[theirs] = sd[ours].t() if transpose else sd[ours]
        if hf_arch(config) == "llama":
            c = config
            sizes = [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
            for kind in ("weight", "bias") if c.bias else ("weight",):
                for n, t in zip("qkv", sd[f"h.{i}.attn.c_attn.{kind}"].split(sizes)):
                    out[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] = t
    out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- demo
def fmt_time(seconds):
    h, m, s = int(seconds) // 3600, int(seconds) // 60 % 60, int(seconds) % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@torch.no_grad()
def estimate_loss(model, loader, iters):
    model.eval()
    losses = [model(*loader.next_batch())[1].item() for _ in range(iters)]
    model.train()
    return sum(losses) / len(losses)


def main():
    t_start = time.time()
    config, dev = check_options()  # bad settings fail before any work
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    with cli.hold_dir(out_dir):  # one run per folder: a second one at once refuses
        run_demo(config, dev, t_start)


def run_demo(config, dev, t_start):
    # 1. data: a bpe vocabulary and token shards, built on the first run and then reused
    data = dataloader.prepare("", "bpe", vocab_size, os.path.join(out_dir, "data"), seed=seed)
    tok = data.tokenizer
    train_data = dataloader.DataLoader(data.train, batch_size, block_size, seed=seed, device=dev)
    val_data = dataloader.DataLoader(data.val, batch_size, block_size, seed=seed, device=dev)
    # 2. model
    model = GPT(replace(config, vocab_size=tok.vocab_size)).to(dev)
    print(f"preset {preset}: {model.num_params():,} parameters, "
          f"{model.flops_per_token() / 1e6:.1f} MFLOPs per token (forward+backward)")
    print(f"data ready in {time.time() - t_start:.0f}s: vocabulary {tok.vocab_size}, "
          f"{data.meta['splits']['train']['tokens']:,} training tokens")
    # 3. train, then check the model before anything is written: a diverged run keeps the
    #    old checkpoint (nan weights give a nan validation loss, even when the last loss was not)
    ckpt_path = os.path.join(out_dir, f"gpt_{preset}.pt")
    t0, it, rows = train_loop(model, train_data, val_data, t_start, ckpt_path)
    val = estimate_loss(model, val_data, eval_iters)
    if not math.isfinite(val) or not all(p.isfinite().all() for p in model.parameters()):
        raise ValueError(diverged("validation loss", val, it, ckpt_path))
    # bits per byte, as train.py prints: nats / ln 2 = bits; / bytes per token = per byte of
    # text, a number that compares across tokenizers (a bigger token has more to predict)
    bpb = val / math.log(2) / data.meta["splits"]["val"]["bytes_per_token"]
    print(f"trained {it} iterations in {fmt_time(time.time() - t0)}; val loss {val:.3f} nats "
          f"per token = {bpb:.3f} bits per byte (a uniform guess: ln({tok.vocab_size}) = "
          f"{math.log(tok.vocab_size):.2f} nats per token)")
    # 4. save: checkpoint + tokenizer, so finetune.py can start from here
    tok_path = os.path.join(out_dir, "tokenizer.json")
    tok.save(tok_path)
    save_checkpoint(ckpt_path, model, tokenizer="tokenizer.json", iter=it)
    print(f"saved {ckpt_path} and {tok_path}")
    # the log, next to the checkpoint (written only now: a diverged run writes nothing), and
    # the loss curve drawn from it
    log_path = os.path.join(out_dir, f"gpt_{preset}.log.jsonl")
    with cli.atomic_open(log_path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows + [{"step": it, "val_loss": val}])
                .encode())
    print(cli.plot_log(log_path, os.path.join(out_dir, f"gpt_{preset}.png"))[0])
    # 5. sample
    eot = tok.special_tokens.get(corpora.EOT)
    for i in range(num_samples):
        out = model.generate([eot], sample_tokens, temperature=temperature, top_k=top_k or None,
                             top_p=top_p, eot_id=eot, seed=seed + i)
        print(f"---- sample {i + 1} ----")
        print(tok.decode([t for t in out[0].tolist() if t != eot]).strip())


def train_loop(model, train_data, val_data, t_start, ckpt_path):
    """AdamW, warmup + cosine; the schedule ends at max_iters or at the time limit (data
    preparation included), whichever comes first. Returns (start time, steps done, log rows:
    the train loss at step 1 and every 25, the val loss every eval_interval); a non-finite
    loss stops it at once."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    deadline = t_start + time_limit if time_limit else math.inf
    t0, it, rows = time.time(), 0, []
    while it < max_iters and time.time() < deadline:
        # the steps that fit before the deadline at the pace so far (at first: all of them)
        steps = min(max_iters, it / (time.time() - t0) * (deadline - t0)) if it else max_iters
        for g in opt.param_groups:
            g["lr"] = lr_at(it, lr, lr / 10, 20, steps)
        x, y = train_data.next_batch()
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):  # going on would only train nan
            raise ValueError(diverged("loss", loss.item(), it + 1, ckpt_path))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        it += 1
        if it % 25 == 0 or it == 1:  # step 1: the loss of a uniform guess, ln(vocab_size)
            dt = time.time() - t0
            rows.append({"step": it, "loss": loss.item()})
            print(f"iter {it:4d} | loss {loss.item():.3f} | {it * x.numel() / dt:,.0f} tok/s"
                  f" | {fmt_time(dt / it * max(0, steps - it))} left")
        if it % eval_interval == 0 and it < max_iters:  # the last one is run_demo's
            rows.append({"step": it, "val_loss": estimate_loss(model, val_data, eval_iters)})
    if it < max_iters:  # say so: fewer steps end at a higher loss
        print(f"time limit: stopped at step {it} of {max_iters} ({time_limit:g} s, data "
              f"preparation included); --time_limit=0 runs all {max_iters} steps")
    return t0, it, rows


def diverged(what, value, step, ckpt_path):
    return (f"the {what} is {value} at step {step}: training diverged (lower --lr={lr:g}); "
            f"nothing was saved, {ckpt_path} is as it was")


def check_options():
    """Every option's range, the preset, the device, and whether a training step fits in
    memory: one line naming the option (cli.check) before any work. Returns (config, device)."""
    cli.check(globals(), [
        ("out_dir", out_dir != "", "a folder name"),
        ("vocab_size", 257 <= vocab_size <= 65536,
         "between 257 (the 256 bytes and <|endoftext|>) and 65536"),
        ("batch_size", batch_size >= 1, "at least 1"), ("block_size", block_size >= 1, "at least 1"),
        ("max_iters", max_iters >= 1, "at least 1"),
        ("time_limit", time_limit >= 0, ">= 0 (0 = no limit)"),
        ("lr", 0 < lr < math.inf, "finite and > 0"),
        ("weight_decay", 0 <= weight_decay < math.inf, "finite and >= 0"),
        ("eval_iters", eval_iters >= 1, "at least 1"),
        ("eval_interval", eval_interval >= 1, "at least 1"),
        ("num_samples", num_samples >= 0, ">= 0 (0 = no samples)"),
        ("sample_tokens", sample_tokens >= 1, "at least 1"),
        ("temperature", 0 <= temperature < math.inf, "finite and >= 0 (0 = greedy)"),
        ("top_k", top_k >= 0, ">= 0 (0 = off)"), ("top_p", 0 < top_p <= 1, "in (0, 1] (1 = off)"),
        ("seed", seed >= 0, ">= 0"), ("threads", 0 <= threads <= cli.MAX_THREADS, f"in [0, {cli.MAX_THREADS}] (0: torch's default)")])
    config = get_config(preset, block_size=block_size, vocab_size=vocab_size)
    dev = pick_device(device)
    if dev.type == "cpu":  # the OOM killer would end the run without a word
        cli.fits_in_memory(train_bytes(config, batch_size), f"preset {preset} with "
                           f"--batch_size={batch_size} --block_size={block_size}")
    return config, dev


if __name__ == "__main__":
    cli.run(main, globals())
