"""block.py - one transformer block, on torch and on our own numpy engine.

What you will learn
  * causal self-attention twice: the readable math, softmax(Q K^T / sqrt(d)) with a
    causal mask, and torch's fused scaled_dot_product_attention (SDPA); they agree;
  * multi-head, grouped-query (GQA) and multi-query attention (n_kv_head = n_head, fewer, 1);
  * the two blocks every modern LLM descends from: "gpt2" (LayerNorm, GELU MLP, learned
    positions added by the model) and "llama" (RMSNorm, SwiGLU MLP, rotary positions, GQA);
  * pre-norm residual connections, dropout;
  * three options from the modded-nanogpt speedrun (off by default; docs/speedrun.md):
    mlp="relu2" (ReLU squared), qk_norm (RMS-normalised queries and keys), zero_init_proj
    (every block starts as the identity);
  * a KV cache: decoding one token at a time with the cache gives the same output as
    recomputing the whole prefix, at a fraction of the work;
  * the bridge from micrograd.py: the same block on our numpy Tensor engine, with the same
    weights, gives the same output and the same gradient for every parameter (float64).

Run it
  python block.py                         # the "gpt2" block
  python block.py --preset=llama --n_kv_head=1 --seq_len=64

It prints the parameter count, FLOPs per token (formula and a count by torch's flop
counter), the largest difference between readable, fast and numpy paths, and the
forward+backward time of each.
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import micrograd as mg

# demo hyperparameters (python block.py --name=value)
preset = "gpt2"        # named block: "gpt2" or "llama"
n_embd = 64
n_head = 4
n_kv_head = 0          # 0 = the preset's choice
batch_size = 2
seq_len = 32
repeat = 5             # timing runs per path (median is printed)
seed = 0


@dataclass
class BlockConfig:
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), fewer = GQA, 1 = MQA
    n_hidden: int | None = None   # MLP width: None = 4*n_embd (gelu) or ~8/3*n_embd (swiglu)
    block_size: int = 128         # longest sequence: size of the RoPE table and of a KV cache
    dropout: float = 0.0
    bias: bool = True             # biases in Linear layers and LayerNorm
    norm: str = "layernorm"       # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"             # "gelu" (tanh approximation, as GPT-2) | "swiglu"
    pos: str = "learned"          # "learned": the model adds a table; "rope": rotate q, k here
    rope_theta: float = 10000.0
    sdpa: bool = True             # fused attention kernel; False = the readable math
    kernels: str = "torch"        # "triton": attention, norms (and gpt.py's loss) from kernels.py
    # speedrun options (docs/speedrun.md); off = the plain GPT-2 / Llama block
    qk_norm: bool = False         # RMS-normalise q and k per head: bounded attention logits
    zero_init_proj: bool = False  # output projections start at 0: each block starts as identity

    CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"),
               "pos": ("learned", "rope"), "kernels": ("torch", "triton")}

    def __post_init__(self):
        """Every field checked here, so a bad value is one ValueError naming it (not a
        ZeroDivisionError or a shape error deep inside torch)."""
        check_fields(self, ints={"n_embd": 1, "n_head": 1, "block_size": 1},
                     optional_ints={"n_kv_head": 1, "n_hidden": 1},
                     floats={"norm_eps": (0, False), "rope_theta": (0, False)},
                     bools=("bias", "sdpa", "qk_norm", "zero_init_proj"))
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r}; must be a number in [0, 1)")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.kernels == "triton" and self.dropout:
            raise ValueError(f"kernels='triton' has no attention dropout; use dropout=0, "
                             f"got {self.dropout}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_dim}")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        if self.n_hidden:
            return self.n_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: a width of 2/3 * 4C gives them as many
        # weights as GELU's two (rounded up to a multiple of 32: exact at C = 384 or 768)
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)


def check_fields(cfg, ints=(), optional_ints=(), floats=(), bools=()):
    """Type and range of a config's fields: ints {name: minimum}, optional_ints the same or
    None, floats {name: (bound, inclusive)} (a finite number above the bound), bools True or
    False. bool is not accepted as an int (True would be a 1-wide model)."""
    def bad(name, need):
        raise ValueError(f"{name}={getattr(cfg, name)!r}; must be {need}")

    for name, low in {**dict(ints), **dict(optional_ints)}.items():
        v = getattr(cfg, name)
        if v is None and name in optional_ints:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            bad(name, f"an int >= {low}" + (" or None" if name in optional_ints else ""))
    for name, (low, inclusive) in dict(floats).items():
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or v < low or (v == low and not inclusive):
            bad(name, f"a finite number {'>=' if inclusive else '>'} {low}")
    for name in bools:
        if not isinstance(getattr(cfg, name), bool):
            bad(name, "True or False")


# the two named blocks (sizes are small defaults; gpt.py sets the real ones)
PRESETS = {
    "gpt2": BlockConfig(),
    "llama": BlockConfig(n_kv_head=2, bias=False, norm="rmsnorm", norm_eps=1e-6,
                         mlp="swiglu", pos="rope"),
}


# ----------------------------------------------------------------------------- norms
def triton_kernels():
    """kernels.py, imported on first use (it needs triton; a CPU-only install may lack it)."""
    import kernels
    return kernels


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, over the channels; bias optional."""

    def __init__(self, n, bias=True, eps=1e-5, kernels="torch"):
        super().__init__()
        self.eps, self.triton = eps, kernels == "triton" and bool(triton_kernels())
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        if self.triton:
            return triton_kernels().layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring, cheaper, no bias."""

    def __init__(self, n, eps=1e-6, kernels="torch"):
        super().__init__()
        self.eps, self.triton = eps, kernels == "triton" and bool(triton_kernels())
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        if self.triton:
            return triton_kernels().rms_norm(x, self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.kernels)
    return LayerNorm(cfg.n_embd, cfg.bias, cfg.norm_eps, cfg.kernels)


# ----------------------------------------------------------------------------- RoPE
def rope_tables(positions, head_dim, theta=10000.0, dtype=torch.float32):
    """cos and sin of angle pos * theta^(-2i/d) for each position, shape (T, head_dim).

    Pair i rotates channels (i, i + d/2): the "rotate_half" layout of Hugging Face's Llama
    (Meta's original code pairs neighbours (2i, 2i+1); HF permuted the q/k weights to match).
    Computed on the fly: cheap, nothing to store, and never in bf16 (angles need precision).
    """
    i = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype)
    inv_freq = 1.0 / theta ** (i / head_dim)                       # (d/2,)
    angles = torch.outer(positions.to(dtype), inv_freq)             # (T, d/2)
    angles = torch.cat([angles, angles], dim=-1)                    # (T, d)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair of x (B, nh, T, d) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    A new token attends to every earlier one, but their keys and values never change:
    keep them instead of recomputing the prefix at each step. Preallocated
    (B, n_kv_head, max_len, head_dim); `n` counts the positions filled.
    """

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=None):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.n = 0

    def update(self, k, v):
        """Append k, v (B, n_kv_head, T, d); return all keys and values so far."""
        T = k.size(2)
        if self.n + T > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; "
                             f"cannot add {T} to the {self.n} already there")
        self.k[:, :, self.n:self.n + T] = k
        self.v[:, :, self.n:self.n + T] = v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


# ----------------------------------------------------------------------------- attention
class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.block_size, self.dropout, self.sdpa = cfg.block_size, cfg.dropout, cfg.sdpa
        # one matmul makes q (n_head heads) and k, v (n_kv_head heads each)
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rope, self.rope_theta = cfg.pos == "rope", cfg.rope_theta
        self.triton = cfg.kernels == "triton" and bool(triton_kernels())
        self.qk_norm, self.norm_eps = cfg.qk_norm, cfg.norm_eps

    def forward(self, x, cache=None):
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q = q.view(B, T, nh, hd).transpose(1, 2)    # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)   # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)   # (B, nkv, T, hd)
        if self.qk_norm:  # each head's q and k at RMS 1: q.k / sqrt(hd) is at most sqrt(hd)
            q = F.rms_norm(q, (hd,), eps=self.norm_eps)
            k = F.rms_norm(k, (hd,), eps=self.norm_eps)
        if self.rope:  # positions continue after what the cache already holds
            start = cache.n if cache is not None else 0
            pos = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_tables(pos, hd, self.rope_theta, torch.promote_types(x.dtype, torch.float32))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)               # (B, nkv, S, hd), S = cached + T
        if self.triton:  # FlashAttention-2; causal aligns query t with key S - T + t
            y = triton_kernels().flash_attention(q, k.to(q.dtype), v.to(q.dtype), causal=True)
        else:
            y = self.attend_fast(q, k, v) if self.sdpa else self.attend_readable(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend_readable(self, q, k, v):
        T, S = q.size(2), k.size(2)
        # GQA: each group of n_head / n_kv_head query heads shares one key/value head
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        att = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)        # (B, nh, T, S)
        # query t sits at position S - T + t and may only look at keys up to there
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        att = att.masked_fill(~mask, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v                                                  # (B, nh, T, hd)

    def attend_fast(self, q, k, v):
        T, S = q.size(2), k.size(2)
        mask = None  # T == S: plain causal; T == 1: the one new token may see everything
        if 1 < T < S:  # a chunk after a cache: SDPA's is_causal would align the mask wrongly
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(T == S and T > 1),
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)

    def new_cache(self, batch_size, max_len=None):
        w = self.c_attn.weight
        return KVCache(batch_size, self.n_kv_head, max_len or self.block_size, self.head_dim,
                       device=w.device, dtype=w.dtype)


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Per-token feed-forward: widen, nonlinearity, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        if self.swiglu:  # a second widening matrix gates the first
            self.c_gate = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)     # (B, T, hidden)
        elif self.relu2:  # max(0, x)^2: as cheap as ReLU, smooth at 0, sparse like it
            h = F.relu(self.c_fc(x)).square()             # (B, T, hidden)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, hidden)
        return self.dropout(self.c_proj(h))


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: normalise each branch's input, keep the residual path clean."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        if cfg.zero_init_proj:
            zero_projections(self)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))          # each token thinks on its own
        return x

    def new_cache(self, batch_size, max_len=None):
        return self.attn.new_cache(batch_size, max_len)


def zero_projections(blk):
    """Zero the two matrices (and biases) that write into the residual stream: each branch
    then adds 0, so a fresh block is the identity and a deep stack starts as a shallow one
    (the gradient still reaches the projections: their inputs are not zero)."""
    with torch.no_grad():
        for lin in (blk.attn.c_proj, blk.mlp.c_proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def matmul_params(module):
    """Weights that take part in a matmul (the 2-D ones): each costs 2 FLOPs per token forward."""
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


def block_flops_per_token(block, T):
    """Forward + backward FLOPs per token: 6 per matmul weight (2 forward, 4 backward) plus
    attention's own matmuls, Q K^T and att @ V, 2 * T * C each forward: 12 * T * C in all
    (counting the full T x T square, as PaLM and nanoGPT do)."""
    C = block.attn.n_head * block.attn.head_dim
    return 6 * matmul_params(block) + 12 * T * C


# ----------------------------------------------------------------------------- numpy engine
def block_numpy(blk, x):
    """The torch Block `blk` recomputed on micrograd's numpy Tensor engine, with copies of its
    weights. x: (B, T, C) numpy array or mg.Tensor. Returns (y, params): y an mg.Tensor,
    params {torch parameter name: mg.Tensor}, so after y.backward(g) every .grad can be
    compared with torch's one to one."""
    W = {n: mg.Tensor(p.detach().cpu().numpy()) for n, p in blk.named_parameters()}
    x = x if isinstance(x, mg.Tensor) else mg.Tensor(x)
    a, drop = blk.attn, lambda t: mg.dropout(t, a.dropout, blk.training)
    B, T, C = x.shape
    nh, nkv, hd = a.n_head, a.n_kv_head, a.head_dim

    def linear(t, name):  # t @ W^T + b, as nn.Linear
        y = t @ W[name + ".weight"].transpose()
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def norm(t, name):
        m = blk.get_submodule(name)
        if isinstance(m, RMSNorm):
            return mg.rms_norm(t, W[name + ".weight"], m.eps)
        return mg.layer_norm(t, W[name + ".weight"], W.get(name + ".bias"), m.eps)

    def rope(t):  # the same rotate_half layout as apply_rope
        angles = np.outer(np.arange(T), 1.0 / a.rope_theta ** (np.arange(0, hd, 2) / hd))
        angles = np.concatenate([angles, angles], axis=-1)             # (T, hd)
        t1, t2 = mg.split(t, hd // 2, axis=-1)
        return t * np.cos(angles) + mg.concat([-t2, t1], axis=-1) * np.sin(angles)

    # attention
    h = norm(x, "ln_1")
    q, k, v = mg.split(linear(h, "attn.c_attn"), [nh * hd, nkv * hd, nkv * hd], axis=-1)
    q = q.reshape(B, T, nh, hd).transpose(1, 2)                         # (B, nh, T, hd)
    k = k.reshape(B, T, nkv, hd).transpose(1, 2)                        # (B, nkv, T, hd)
    v = v.reshape(B, T, nkv, hd).transpose(1, 2)
    if a.qk_norm:
        q, k = mg.rms_norm(q, eps=a.norm_eps), mg.rms_norm(k, eps=a.norm_eps)
    if a.rope:
        q, k = rope(q), rope(k)
    heads = np.repeat(np.arange(nkv), nh // nkv)                        # GQA: share kv heads
    k, v = k[:, heads], v[:, heads]                                     # (B, nh, T, hd)
    att = q @ k.transpose() * (1.0 / math.sqrt(hd))                     # (B, nh, T, T)
    att = mg.masked_fill(att, np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf)
    y = drop(mg.softmax(att, axis=-1)) @ v                              # (B, nh, T, hd)
    x = x + drop(linear(y.transpose(1, 2).reshape(B, T, C), "attn.c_proj"))
    # MLP
    h = norm(x, "ln_2")
    if blk.mlp.swiglu:
        g = linear(h, "mlp.c_gate")
        h = g * g.sigmoid() * linear(h, "mlp.c_fc")                     # silu(gate) * up
    elif blk.mlp.relu2:
        h = linear(h, "mlp.c_fc").relu()
        h = h * h
    else:
        h = mg.gelu(linear(h, "mlp.c_fc"), approximate="tanh")
    return x + drop(linear(h, "mlp.c_proj")), W


# ----------------------------------------------------------------------------- demo
def fwd_bwd_time(fn, repeat):
    """Median seconds of fn() (one forward + backward) over `repeat` runs, after a warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def demo_bytes(B, T, C, n_head):
    """A generous estimate of the demo's peak memory, float64: the weights (~12 C^2, about 5
    copies: values, gradients, numpy's copies) and, per token, the activations autograd and
    the numpy engine keep (~40 C), plus the readable attention's (B, nh, T, T) scores (~8
    copies: scores, mask, softmax, dropout, their gradients, both engines)."""
    return 8 * (5 * 12 * C * C + 40 * B * T * C + 8 * B * n_head * T * T)


def check_demo_options():
    cli.check(globals(), [
        ("n_embd", n_embd >= 1, "at least 1"), ("n_head", n_head >= 1, "at least 1"),
        ("n_kv_head", n_kv_head >= 0, ">= 0 (0 = the preset's choice)"),
        ("batch_size", batch_size >= 1, "at least 1"), ("seq_len", seq_len >= 1, "at least 1"),
        ("repeat", repeat >= 1, "at least 1")])
    cli.one_of("preset", preset, list(PRESETS))
    cli.fits_in_memory(demo_bytes(batch_size, seq_len, n_embd, n_head),
                       f"--batch_size={batch_size} --seq_len={seq_len} --n_embd={n_embd} "
                       f"--n_head={n_head}")


def main():
    check_demo_options()  # before any work: ranges, the preset, the memory it needs
    torch.manual_seed(seed)
    cfg = replace(PRESETS[preset], n_embd=n_embd, n_head=n_head, block_size=seq_len,
                  **({"n_kv_head": n_kv_head} if n_kv_head else {}))
    blk = Block(cfg).double()  # float64: differences show the math, not rounding
    print(f"block {preset!r}: {cfg}")
    n = sum(p.numel() for p in blk.parameters())
    print(f"parameters: {n:,} ({matmul_params(blk):,} in matmuls)")

    x = torch.randn(batch_size, seq_len, n_embd, dtype=torch.float64, requires_grad=True)
    g = torch.randn(batch_size, seq_len, n_embd, dtype=torch.float64)

    def run_torch(sdpa):
        blk.attn.sdpa = sdpa
        blk.zero_grad()
        x.grad = None
        y = blk(x)
        y.backward(g)
        return y.detach(), {k: p.grad.clone() for k, p in blk.named_parameters()}

    def run_numpy():
        y, W = block_numpy(blk, x.detach().numpy())
        y.backward(g.numpy())
        return torch.from_numpy(y.data), {k: torch.from_numpy(w.grad) for k, w in W.items()}

    with FlopCounterMode(display=False) as fc:  # the readable path: every matmul is visible
        run_torch(sdpa=False)
    per_token = block_flops_per_token(blk, seq_len)
    print(f"FLOPs per token, forward+backward at T={seq_len}: formula 6*N + 12*T*C = "
          f"6*{matmul_params(blk):,} + 12*{seq_len}*{n_embd} = {per_token:,}; "
          f"torch's flop counter: {fc.get_total_flops() // x[..., 0].numel():,}")

    results = {"readable": run_torch(False), "fast (SDPA)": run_torch(True), "numpy": run_numpy()}
    ref_y, ref_g = results["readable"]
    print("\nlargest difference from the readable torch path (float64):")
    for name, (y, grads) in list(results.items())[1:]:
        dg = max((grads[k] - ref_g[k]).abs().max().item() for k in ref_g)
        print(f"  {name:12s} output {(y - ref_y).abs().max().item():.1e}   gradients {dg:.1e}")

    runs = {"readable": lambda: run_torch(False), "fast (SDPA)": lambda: run_torch(True),
            "numpy": run_numpy}
    times = {name: fwd_bwd_time(fn, repeat) for name, fn in runs.items()}
    base = times["fast (SDPA)"]
    print(f"\nforward+backward, B={batch_size} T={seq_len} C={n_embd}, float64, median of {repeat}:")
    print(f"  {'path':12s} {'ms':>8s} {'x fast':>8s}")
    for name, t in times.items():
        print(f"  {name:12s} {t * 1e3:8.2f} {t / base:8.2f}")


if __name__ == "__main__":
    cli.run(main, globals())
