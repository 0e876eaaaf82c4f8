"""kernels.py - Triton kernels for the model: FlashAttention-2 (forward + backward), LayerNorm
and RMSNorm (forward + backward), and a fused softmax cross-entropy. Phase 5b: read it after
cuda_primer.py, whose numpy flash_attention and online_softmax are the same algorithms.

What you will learn
  * how a Triton program maps onto the GPU: one program per tile of rows, its tiles in
    registers / shared memory (SRAM), only inputs and outputs in global memory (HBM);
  * FlashAttention-2's forward: the running max and the log-sum-exp (LSE) make softmax a
    single pass over K and V, and the (T, T) scores never reach HBM;
  * its backward: recompute P tile by tile from Q, K and the saved LSE instead of storing it;
    D = rowsum(dO * O) first, then one kernel for dK, dV (a program per key tile) and one for
    dQ (a program per query tile): no atomics, no (T, T) matrix;
  * GQA for free: query heads of a group read the same K/V head, dK/dV sum over the group;
  * masks only where needed: full tiles run an unmasked copy of the loop body, only the tiles
    the causal diagonal crosses (and a ragged last tile) pay for the mask (~27% fewer
    instructions in the loops, counted in docs/kernels.md);
  * LayerNorm / RMSNorm in one read and one write per row, mean and 1/std saved for backward,
    weight and bias gradients reduced per program, then across programs;
  * cross-entropy that never materializes (tokens x vocab) probabilities in fp32: a program
    streams its row in chunks (online max and sum); the backward writes the gradient, scaled
    by the upstream gradient in fp32 (fp16's GradScaler), into the logits buffer itself.

Run it
  python kernels.py                            # each kernel vs torch (CPU: the interpreter, s)
  python cuda_primer.py --sections=kernels     # the same, inside the primer's kernels section
  python bench.py --only=kernels --device=cuda # speed vs SDPA flash / cuDNN, eager, compile

On a machine without CUDA this file switches on Triton's interpreter (TRITON_INTERPRET=1,
before any kernel is decorated): the same kernels run on CPU tensors with numpy, slowly but
exactly, so they can be read, stepped through and tested anywhere. The interpreter computes
fp32 and fp64 dots correctly but not bf16 ones: on a CPU use float32 (or float64).
Imports torch and triton only (block.py imports this file lazily, when kernels="triton").
"""
import math
import os

import torch

if not torch.cuda.is_available():  # no GPU: run the kernels with numpy (before @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError as e:  # CPU-only torch wheels do not bring triton
    _missing = ("kernels='triton' needs the triton package: pip install triton "
                "(CUDA builds of torch already ship it)")
    if __name__ == "__main__":  # python kernels.py: one line, as every demo's errors
        raise SystemExit(f"error: {_missing}") from None
    raise ImportError(_missing) from e

# demo options (python kernels.py --name=value)
device = "auto"          # "auto" (cuda when available, else the interpreter on cpu), "cpu", "cuda"
seed = 0

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_HEAD_DIM = 128       # q, k, v tiles of 64-128 rows x 128 columns fill an SM's SRAM
MAX_NORM_WIDTH = 16384   # one row of a norm is held in registers at once
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ============================================================================ FlashAttention-2
# Shapes: q (B, H, T, d); k, v (B, Hkv, S, d), H a multiple of Hkv (GQA); o like q; lse (B, H, T).
# One program owns BLOCK_M query rows of one head. Per program, on chip:
#   registers/SRAM: the q tile (BLOCK_M, d); one k and one v tile (BLOCK_N, d) at a time;
#                   the scores s (BLOCK_M, BLOCK_N); acc (BLOCK_M, d); m, l (BLOCK_M,)
#   HBM:            read q once, k and v once per query tile; write o and lse once.
# Why one pass works: softmax needs the row max and the row sum before it can normalize. Keep a
# running max m and a running sum l of exp(s - m); when a new tile raises m, everything summed
# so far (l and the output accumulator acc) is multiplied by exp(m_old - m_new), the same
# correction for both. After the last tile acc / l is the output, and m + log(l) = logsumexp(s)
# is all the backward needs to rebuild P = exp(s - lse) exactly, tile by tile.

@triton.jit
def _sum(x, axis: tl.constexpr):
    # = tl.sum(x, axis). tl.sum, tl.max and tl.zeros are themselves @triton.jit functions of
    # triton's library: when torch imported triton before TRITON_INTERPRET was set, they were
    # built for the GPU and fail in the interpreter. tl.reduce and tl.full are builtins.
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 on a GPU would round the inputs to tf32 (10-bit mantissa); "ieee" keeps them exact
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# Masks cost instructions on every element of a tile, so the key loop is split in two: tiles
# entirely left of the causal diagonal and inside the sequence run without any mask, and only
# the tiles the diagonal crosses (causal) or the ragged last tile (length not a tile multiple)
# build one. The tile body is one @triton.jit function called twice, MASK a compile-time flag.
# Under a causal mask no separate bounds mask is needed: a real query row t sees keys up to
# S - T + t <= S - 1. Constants are made in the accumulator's dtype (tl.full) and the scale
# arrives as float64, so the fp64 path is fp64 throughout (a Python float literal is fp32).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2 e): exp2 is the GPU's own
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_keys(base, stride, keys, S, dim_ok, MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of K or V at positions `keys`; bounds-masked in MASK tiles only."""
    mask = dim_ok[None, :]
    if MASK:
        mask = mask & (keys < S)[:, None]
    return tl.load(base + keys[:, None] * stride + tl.arange(0, BLOCK_D)[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _attn_fwd_tiles(q, acc, m, l, kbase, vbase, skt, svt, rows, lo, hi, S, offset, qk_scale,
                    dim_ok, MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key tiles [lo, hi) into the running (acc, m, l) of one query tile."""
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_keys(kbase, skt, keys, S, dim_ok, MASK, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE).to(ACC) * qk_scale                 # (BLOCK_M, BLOCK_N)
        if MASK:
            if CAUSAL:
                s = tl.where(keys[None, :] <= rows[:, None] + offset, s, float("-inf"))
            else:
                s = tl.where((keys < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, _max(s, 1))
        if MASK:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)                    # shrink what was summed before
        l = l * alpha + _sum(p, 1)
        v = _load_keys(vbase, svt, keys, S, dim_ok, MASK, BLOCK_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE).to(ACC)
        m = m_new
    return acc, m, l


@triton.jit
def _key_tiles(pid_m, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, end): query tile pid_m reads key tiles [0, full) without a mask, [full, end)
    with one. Causal: keys right of the tile's last query are skipped (end), and a tile is
    full when its last key is visible to the tile's first query."""
    offset = S - T                 # query t sits at key position S - T + t (after a cache)
    full = S // BLOCK_N * BLOCK_N  # tiles with no key past S
    end = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
        full = tl.minimum(full, (pid_m * BLOCK_M + offset + 1) // BLOCK_N * BLOCK_N)
    return full, end


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              H, GROUP, T, S, D, scale: tl.float64,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP                                   # GQA: the K/V head of this query head
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)    # query positions of this tile
    dims = tl.arange(0, BLOCK_D)                      # d rounded up to a power of two
    row_ok, dim_ok = rows < T, dims < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)       # (BLOCK_M, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), ACC)        # running max (base-2 units)
    l = tl.full([BLOCK_M], 0.0, ACC)                      # running sum of exp2(s - m)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)           # running unnormalized output
    qk_scale = (scale * tl.full([], LOG2E, ACC)).to(ACC)  # fold the scale and log2(e) together
    full, end = _key_tiles(pid_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
    acc, m, l = _attn_fwd_tiles(q, acc, m, l, kbase, vbase, skt, svt, rows, 0, full, S, S - T,
                                qk_scale, dim_ok, False, CAUSAL, IEEE, ACC, BLOCK_N, BLOCK_D)
    acc, m, l = _attn_fwd_tiles(q, acc, m, l, kbase, vbase, skt, svt, rows, full, end, S, S - T,
                                qk_scale, dim_ok, True, CAUSAL, IEEE, ACC, BLOCK_N, BLOCK_D)
    acc = acc / l[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dims[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    # natural-log LSE = (m + log2 l) * ln 2; one float per row is all the backward keeps
    tl.store(LSE + bh * T + rows, (m + tl.log2(l)) * tl.full([], LN2, ACC), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T, D, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the term softmax's backward subtracts."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (dims < D)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + dims[None, :], mask=mask,
                 other=0.0)
    tl.store(DELTA + bh * T + rows, _sum(o.to(ACC) * do.to(ACC), 1), mask=rows < T)


@triton.jit
def _attn_dkdv_tiles(dk, dv, k, v, qbase, dobase, lbase, dbase, sqt, sdt, keys, lo, hi, T,
                     offset, qk_scale, dim_ok, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                     IEEE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Query tiles [lo, hi) of one head into (dk, dv) of one key tile. Masked tiles: rows past
    T (loaded as q = dO = lse = D = 0) and, causal, queries left of a key. Keys past S need
    no mask: their rows of dk and dv are never stored."""
    dims = tl.arange(0, BLOCK_D)
    log2e = tl.full([], LOG2E, ACC)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_mask = dim_ok[None, :]
        if MASK:
            q_mask = q_mask & (rows < T)[:, None]
            lse = tl.load(lbase + rows, mask=rows < T, other=0.0)
            delta = tl.load(dbase + rows, mask=rows < T, other=0.0)
        else:
            lse, delta = tl.load(lbase + rows), tl.load(dbase + rows)
        q = tl.load(qbase + rows[:, None] * sqt + dims[None, :], mask=q_mask, other=0.0)
        do = tl.load(dobase + rows[:, None] * sdt + dims[None, :], mask=q_mask, other=0.0)
        # the transposed scores s^T (BLOCK_N, BLOCK_M), so no transpose of P is needed
        st = _dot(k, tl.trans(q), IEEE).to(ACC) * qk_scale
        pt = tl.exp2(st - lse[None, :] * log2e)
        if MASK:
            ok = (rows < T)[None, :]
            if CAUSAL:
                ok = ok & (keys[:, None] <= rows[None, :] + offset)
            pt = tl.where(ok, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE).to(ACC)
        dpt = _dot(v, tl.trans(do), IEEE).to(ACC)                         # (dO v^T)^T
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE).to(ACC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   H, HKV, GROUP, T, S, D, scale: tl.float64,
                   CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (key tile, K/V head): k, v, dk, dv stay on chip while every query tile
    of every query head in the GQA group streams past. P is rebuilt from q, k and the LSE:
        P = exp(q k^T * scale - lse)   dV += P^T dO   dP = dO v^T
        dS = P * (dP - D)              dK += dS^T q * scale
    Query tiles [lo, a) cross the diagonal (masked), [a, b) see every key of the tile
    (no mask), [b, T) is the ragged last tile (masked; empty when T is a tile multiple)."""
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    kv_mask = (keys < S)[:, None] & dim_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + keys[:, None] * skt + dims[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * svb + hk * svh + keys[:, None] * svt + dims[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, ACC)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, ACC)
    qk_scale = (scale * tl.full([], LOG2E, ACC)).to(ACC)
    offset = S - T
    t_end = (T + BLOCK_M - 1) // BLOCK_M * BLOCK_M   # (tl.cdiv is a library @jit: see _sum)
    lo, a = 0, 0
    if CAUSAL:  # queries before this tile's first key see none of it: start below them
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        a = tl.minimum((tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1)
                       // BLOCK_M * BLOCK_M, t_end)
    b_ = tl.maximum(a, T // BLOCK_M * BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        qbase, dobase = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
        lbase, dbase = LSE + (b * H + h) * T, DELTA + (b * H + h) * T
        dk, dv = _attn_dkdv_tiles(dk, dv, k, v, qbase, dobase, lbase, dbase, sqt, sdt, keys,
                                  lo, a, T, offset, qk_scale, dim_ok, True, CAUSAL, IEEE, ACC,
                                  BLOCK_M, BLOCK_D)
        dk, dv = _attn_dkdv_tiles(dk, dv, k, v, qbase, dobase, lbase, dbase, sqt, sdt, keys,
                                  a, b_, T, offset, qk_scale, dim_ok, False, CAUSAL, IEEE, ACC,
                                  BLOCK_M, BLOCK_D)
        dk, dv = _attn_dkdv_tiles(dk, dv, k, v, qbase, dobase, lbase, dbase, sqt, sdt, keys,
                                  b_, t_end, T, offset, qk_scale, dim_ok, True, CAUSAL, IEEE,
                                  ACC, BLOCK_M, BLOCK_D)
    base = (b * HKV + hk) * S * D  # dk, dv: fresh contiguous (B, Hkv, S, d) tensors
    sc = (tl.full([], 1.0, ACC) * scale).to(ACC)
    tl.store(DK + base + keys[:, None] * D + dims[None, :], (dk * sc).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + base + keys[:, None] * D + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_dq_tiles(dq, q, do, lse2, delta, kbase, vbase, skt, svt, rows, lo, hi, S, offset,
                   qk_scale, dim_ok, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   IEEE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Key tiles [lo, hi) into dq of one query tile (lse2: the LSE in base-2 units)."""
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_keys(kbase, skt, keys, S, dim_ok, MASK, BLOCK_D)
        v = _load_keys(vbase, svt, keys, S, dim_ok, MASK, BLOCK_D)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE).to(ACC) * qk_scale - lse2[:, None])
        if MASK:
            if CAUSAL:
                p = tl.where(keys[None, :] <= rows[:, None] + offset, p, 0.0)
            else:
                p = tl.where((keys < S)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE).to(ACC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                 H, GROUP, T, S, D, scale: tl.float64,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per query tile: q, dO, lse, D and dq on chip, the key tiles stream past:
        dS = P * (dO v^T - D)          dQ += dS k * scale"""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q_mask = (rows < T)[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + dims[None, :], mask=q_mask,
                 other=0.0)
    lse2 = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0) * tl.full([], LOG2E, ACC)
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)
    qk_scale = (scale * tl.full([], LOG2E, ACC)).to(ACC)
    full, end = _key_tiles(pid_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
    dq = _attn_dq_tiles(dq, q, do, lse2, delta, kbase, vbase, skt, svt, rows, 0, full, S, S - T,
                        qk_scale, dim_ok, False, CAUSAL, IEEE, ACC, BLOCK_N, BLOCK_D)
    dq = _attn_dq_tiles(dq, q, do, lse2, delta, kbase, vbase, skt, svt, rows, full, end, S,
                        S - T, qk_scale, dim_ok, True, CAUSAL, IEEE, ACC, BLOCK_N, BLOCK_D)
    sc = (tl.full([], 1.0, ACC) * scale).to(ACC)
    tl.store(DQ + (bh * T + rows[:, None]) * D + dims[None, :],
             (dq * sc).to(DQ.dtype.element_ty), mask=q_mask)


def _check_attention(q, k, v, causal):
    """One ValueError naming the limit for every shape the kernels do not handle."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise ValueError("flash_attention wants torch tensors q, k, v")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention wants 4-D (B, heads, T, head_dim) tensors, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match "
                         f"each other and q {tuple(q.shape)} in batch and head_dim")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    _check_device("flash_attention", q, k, v)
    H, Hkv, d = q.size(1), k.size(1), q.size(3)
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_attention: {H} query heads are not a multiple of {Hkv} "
                         "key/value heads (GQA needs n_head % n_kv_head == 0)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim {d} is not supported (1 to {MAX_HEAD_DIM})")
    if causal and q.size(2) > k.size(2):
        raise ValueError(f"flash_attention: causal with {q.size(2)} queries but only "
                         f"{k.size(2)} keys leaves rows with nothing to attend to")
    if any(t.stride(-1) != 1 and t.size(-1) > 1 for t in (q, k, v)):
        raise ValueError("flash_attention needs the head_dim axis contiguous (stride 1): "
                         "call .contiguous() first")


def _check_device(what, *tensors, floats=99):
    """Same device, one the kernels can run on; the first `floats` tensors of a float dtype."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"{what}: all tensors must be on one device, got "
                         f"{', '.join(str(t.device) for t in tensors)}")
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"{what}: tensors on {dev} need a CUDA GPU, or TRITON_INTERPRET=1 set "
                         "before kernels.py is imported")
    if dev.type == "cuda" and INTERPRET:
        raise ValueError(f"{what}: TRITON_INTERPRET=1 runs kernels on CPU tensors only; "
                         f"got {dev}")
    for t in tensors[:floats]:
        if t.dtype not in FLOATS:
            raise ValueError(f"{what}: dtype {t.dtype} is not supported (float16, bfloat16, "
                             "float32, float64)")


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# FlashAttention-2's tiles per GPU, chosen from what sass.py reads in the compiled kernels
# (registers, spills, shared memory; python sass.py --target=all). compute capability ->
# ({largest head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages)}, why). Every entry compiles
# with no spill and within the block's shared memory for all three kernels (test_sass_...).
FLASH_TILES = {
    (8, 0): ({64: (128, 64, 8, 3), 128: (128, 32, 8, 2)},
             "A100, 163 KB a block: 128-row tiles on 8 warps keep 8 warps per SM, as 64 x 64 on "
             "4 would, and each k, v tile serves twice the queries"),
    (8, 6): ({64: (64, 64, 4, 3), 128: (64, 32, 4, 2)},
             "99 KB a block: 64-row tiles; at d = 128 two stages, not three, take the forward "
             "from 53 to 37 KB of shared memory and from 4 to 8 warps per SM"),
    (8, 9): ({64: (64, 64, 4, 3), 128: (64, 32, 4, 2)}, "RTX 40xx: the limits of sm_86"),
    (9, 0): ({64: (128, 64, 8, 3), 128: (128, 64, 8, 2)},
             "H100, 227 KB a block: 128 x 64 tiles on two warpgroups (HGMMA): the forward at "
             "d = 64 keeps 16 warps per SM, against 8 for 64 x 64 on 4 warps"),
    (12, 0): ({64: (64, 64, 4, 3), 128: (64, 32, 4, 2)}, "RTX 50xx: 99 KB a block, as sm_89"),
}
FLASH_DEFAULT = (8, 6)   # an unlisted GPU gets the row with the least shared memory


def flash_tiles(d, cc):
    """FLASH_TILES' (BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim d on a GPU of
    compute capability cc, e.g. (8, 9)."""
    sizes = FLASH_TILES.get(tuple(cc), FLASH_TILES[FLASH_DEFAULT])[0]
    return sizes[min(dmax for dmax in sizes if d <= dmax)]


def _tiles(d, cc):
    """The tiles a launch uses: tiny on the interpreter, so that the tests cross several."""
    return (16, 16, 4, 1) if INTERPRET else flash_tiles(d, cc)


def _flash_forward(q, k, v, causal, scale):
    B, H, T, d = q.shape
    S, Hkv = k.size(2), k.size(1)
    o = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float64 if q.dtype == torch.float64
                      else torch.float32)
    bm, bn, warps, stages = _tiles(d, _capability(q.device))
    grid = (triton.cdiv(T, bm), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    *o.stride()[:3], H, H // Hkv, T, S, d, scale,
                    CAUSAL=causal, IEEE=q.dtype == torch.float32, ACC=_acc(q.dtype),
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
                    num_warps=warps, num_stages=stages)
    return o, lse


def _capability(device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


class FlashAttention(torch.autograd.Function):
    """o = softmax(q k^T * scale [causal]) v; saves only q, k, v, o and the LSE (B, H, T)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _flash_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        B, H, T, d = q.shape
        Hkv, S = k.size(1), k.size(2)
        bm, bn, warps, stages = _tiles(d, _capability(q.device))
        bd = max(16, triton.next_power_of_2(d))
        kw = dict(CAUSAL=ctx.causal, IEEE=q.dtype == torch.float32, ACC=_acc(q.dtype),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        delta = torch.empty_like(lse)
        _attn_bwd_delta[(triton.cdiv(T, bm), B * H)](o, do, delta, *o.stride()[:3],
                                                     *do.stride()[:3], H, T, d, ACC=_acc(q.dtype),
                                                     BLOCK_M=bm, BLOCK_D=bd)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        dk = torch.empty(B, Hkv, S, d, device=k.device, dtype=k.dtype)
        dv = torch.empty_like(dk)
        _attn_bwd_dkdv[(triton.cdiv(S, bn), B * Hkv)](q, k, v, do, lse, delta, dk, dv, *strides,
                                                      H, Hkv, H // Hkv, T, S, d, ctx.scale, **kw)
        dq = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
        _attn_bwd_dq[(triton.cdiv(T, bm), B * H)](q, k, v, do, lse, delta, dq, *strides,
                                                  H, H // Hkv, T, S, d, ctx.scale, **kw)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=True, scale=None, return_lse=False):
    """Attention of q (B, H, T, d) over k, v (B, Hkv, S, d) -> (B, H, T, d), differentiable.

    causal: query t sees keys up to S - T + t (S == T: the usual mask; S > T: a chunk after a
    KV cache). scale: default 1/sqrt(d). return_lse: also the (B, H, T) log-sum-exp of the
    scaled scores (no gradient through it).
        >>> q = k = v = torch.randn(1, 2, 5, 16)
        >>> flash_attention(q, k, v).shape
        torch.Size([1, 2, 5, 16])
    """
    _check_attention(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    if return_lse:
        with torch.no_grad():
            return _flash_forward(q, k, v, causal, scale)
    return FlashAttention.apply(q, k, v, causal, scale)


# ============================================================================ LayerNorm, RMSNorm
# x (M, N): one program per row in the forward. The row is read from HBM once into registers;
# mean, variance, normalize, scale and shift happen there; y is written once. Eager
# F.layer_norm is already one kernel; the written-out RMSNorm of block.py is ~5 (pow, mean,
# rsqrt, two multiplies), each a trip through HBM. mean and rstd (2 floats a row) are saved.
# Backward, xhat = (x - mean) * rstd, g = dy * w:
#   LayerNorm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
#   RMSNorm    dx = rstd * (g - xhat * mean(g * xhat))
#   dw = sum over rows of dy * xhat, db = sum of dy: each program sums its own block of rows
#   in registers and writes one partial row; torch adds the (programs, N) partials.

@triton.jit
def _norm_fwd(X, W, B, Y, MEAN, RSTD, sx, sy, M, N, eps,
              RMS: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # BLOCK_R whole rows
    cols = tl.arange(0, BLOCK)                                 # N rounded up to a power of 2
    rok, cok = rows < M, cols < N
    ok = rok[:, None] & cok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=ok, other=0.0).to(ACC)
    if RMS:
        mean = tl.full([BLOCK_R], 0.0, ACC)
    else:
        mean = _sum(x, 1) / N
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(xc * xc, 1) / N + eps)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=cok, other=0.0).to(ACC)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=cok, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * sy + cols[None, :], y.to(Y.dtype.element_ty),
             mask=ok)
    tl.store(MEAN + rows, mean, mask=rok)
    tl.store(RSTD + rows, rstd, mask=rok)


@triton.jit
def _norm_bwd(X, W, DY, DX, MEAN, RSTD, DW, DB, sx, sdy, sdx, M, N, ROWS,
              RMS: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cok = cols < N
    w = tl.load(W + cols, mask=cok, other=0.0).to(ACC)
    dw = tl.full([BLOCK], 0.0, ACC)   # this program's share of dw and db, in registers
    db = tl.full([BLOCK], 0.0, ACC)
    for start in range(pid * ROWS, tl.minimum(pid * ROWS + ROWS, M), BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rok = rows < M
        ok = rok[:, None] & cok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * sx + cols[None, :], mask=ok, other=0.0).to(ACC)
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=ok, other=0.0).to(ACC)
        mean = tl.load(MEAN + rows, mask=rok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c = _sum(g * xhat, 1) / N
        if RMS:
            dx = (g - xhat * c[:, None]) * rstd[:, None]
        else:
            dx = (g - (_sum(g, 1) / N)[:, None] - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + r64 * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += _sum(dy * xhat, 0)
        db += _sum(dy, 0)
    tl.store(DW + pid * N + cols, dw, mask=cok)
    if HAS_B:
        tl.store(DB + pid * N + cols, db, mask=cok)


def _rows(x):
    """x (..., N) as (M, N) with unit column stride (a copy only if it has to be)."""
    x2 = x.reshape(-1, x.size(-1))
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _row_block(block):
    """Rows per tile: 16 under the interpreter (it pays per operation, not per element);
    on a GPU enough rows for ~4096 elements a tile."""
    return 16 if INTERPRET else max(1, min(16, 4096 // block))


class Norm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        shape, N = x.shape, x.size(-1)
        x2 = _rows(x)
        M = x2.size(0)
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        mean = torch.empty(M, device=x.device, dtype=_stat(x.dtype))
        rstd = torch.empty(M, device=x.device, dtype=_stat(x.dtype))
        block = triton.next_power_of_2(N)
        br = _row_block(block)
        _norm_fwd[(triton.cdiv(M, br),)](
            x2, weight, bias if bias is not None else weight, y, mean, rstd, x2.stride(0),
            y.stride(0), M, N, eps, RMS=rms, HAS_B=bias is not None, ACC=_acc(x.dtype),
            BLOCK_R=br, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.shape = rms, bias is not None, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(N)
        br = _row_block(block)
        # enough programs to fill the GPU, few enough that the partial sums stay small
        ROWS = br * max(1, triton.cdiv(M, br * 4 * _sm_count(x2.device)))
        progs = triton.cdiv(M, ROWS)
        dw = torch.empty(progs, N, device=x2.device, dtype=_stat(x2.dtype))
        db = torch.empty_like(dw) if ctx.has_bias else dw
        _norm_bwd[(progs,)](x2, weight, dy2, dx, mean, rstd, dw, db, x2.stride(0), dy2.stride(0),
                            dx.stride(0), M, N, ROWS, RMS=ctx.rms, HAS_B=ctx.has_bias,
                            ACC=_acc(x2.dtype), BLOCK_R=br, BLOCK=block,
                            num_warps=_warps(block))
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dweight, dbias, None, None


def _warps(block):
    return 8 if block >= 2048 else 4


def _sm_count(device):
    if device.type != "cuda":
        return 1   # the interpreter: one program sums every row
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_norm(what, x, weight, bias):
    tensors = [x, weight] + ([bias] if bias is not None else [])
    _check_device(what, *tensors)
    N = x.size(-1) if x.dim() else 0
    if x.dim() < 1 or weight.shape != (N,) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"{what}: weight{'' if bias is None else ' and bias'} must have shape "
                         f"({N},) for x of shape {tuple(x.shape)}")
    if not 1 <= N <= MAX_NORM_WIDTH:
        raise ValueError(f"{what}: rows of {N} values are not supported (1 to {MAX_NORM_WIDTH})")


def layer_norm(x, weight, bias=None, eps=1e-5):
    """F.layer_norm(x, (N,), weight, bias, eps) over the last axis, fused, differentiable.
    The output has x's dtype; statistics and sums are fp32 (fp64 for fp64 inputs)."""
    _check_norm("layer_norm", x, weight, bias)
    return Norm.apply(x, weight, bias, float(eps), False)


def rms_norm(x, weight, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, fused, differentiable."""
    _check_norm("rms_norm", x, weight, None)
    return Norm.apply(x, weight, None, float(eps), True)


# ============================================================================ cross-entropy
# logits (M, V), targets (M,). Eager F.cross_entropy in a bf16 autocast run: the logits are
# cast to fp32 (a new M x V fp32 tensor), log_softmax writes another and keeps it for backward,
# and backward writes an fp32 gradient before casting it to bf16: at GPT-2 scale (M = 8192,
# V = 50,304) each fp32 copy is 1.5 GiB. Here one program owns a block of rows and streams
# them in chunks of BLOCK_V. Forward: a running max m and sum l (online softmax, as in
# attention) give lse = m + log l and loss = lse - logit[target]; only the loss and lse (one
# fp32 each per row) are written. Backward: re-read the row and write
#     d loss / d logit = (softmax - onehot) * dloss / n_valid
# computed in fp32, straight into the logits buffer when inplace, in the logits' own dtype.
# Why the backward and not the forward: the upstream gradient dloss carries GradScaler's
# scale (65,536 at the start of an fp16 run). Written in the forward, softmax / n_valid
# (~1e-9 at GPT-2 scale) would round to 0 in fp16 before the scale could lift it into range,
# and the scale itself (65,536 > fp16's max 65,504) would overflow. Nothing of size M x V is
# allocated. Rows whose target is ignore_index get a loss of 0 and a zero gradient; n_valid
# and dloss are read from device memory (no host sync).

@triton.jit
def _xent_fwd(LOGITS, TARGETS, LOSS, LSE, sl, M, V, ignore_index, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rok = rows < M
    target = tl.load(TARGETS + rows, mask=rok, other=ignore_index)
    base = LOGITS + rows[:, None].to(tl.int64) * sl                   # (BLOCK_R, 1) pointers
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_R, BLOCK_V], float("-inf"), ACC)  # per-lane running max and sum,
    l = tl.full([BLOCK_R, BLOCK_V], 0.0, ACC)            # merged across lanes at the end
    for start in range(0, V, BLOCK_V):
        ok = rok[:, None] & (start + cols < V)[None, :]
        x = tl.load(base + start + cols[None, :], mask=ok, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # lanes that saw nothing yet
        l = l * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = _max(m, 1)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)          # padding rows
    lse = m_row + tl.log(tl.where(rok, _sum(l * tl.exp(m - m_row[:, None]), 1), 1.0))
    skip = (target == ignore_index) | (rows >= M)
    safe_t = tl.where(skip, 0, target)
    x_t = tl.load(LOGITS + rows.to(tl.int64) * sl + safe_t, mask=rok, other=0.0).to(ACC)
    tl.store(LOSS + rows, tl.where(skip, 0.0, lse - x_t), mask=rok)
    tl.store(LSE + rows, lse, mask=rok)


@triton.jit
def _xent_bwd(LOGITS, TARGETS, LSE, GRAD, NVALID, DLOSS, sl, sg, M, V, ignore_index,
              ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rok = rows < M
    target = tl.load(TARGETS + rows, mask=rok, other=ignore_index)
    skip = (target == ignore_index) | (rows >= M)
    lse = tl.load(LSE + rows, mask=rok, other=0.0)
    # the whole chain rule in fp32 before the one rounding to the logits' dtype
    k = tl.load(DLOSS).to(ACC) / tl.load(NVALID).to(ACC)
    base = LOGITS + rows[:, None].to(tl.int64) * sl
    gbase = GRAD + rows[:, None].to(tl.int64) * sg
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        ok = rok[:, None] & (c < V)[None, :]
        x = tl.load(base + c[None, :], mask=ok, other=0.0).to(ACC)
        hot = tl.where(c[None, :] == target[:, None], 1.0, 0.0)
        g = tl.where(skip[:, None], 0.0, (tl.exp(x - lse[:, None]) - hot) * k)
        tl.store(gbase + c[None, :], g.to(GRAD.dtype.element_ty), mask=ok)


def _xent_launch(M, V):
    """Grid and tile options: 16 rows a program under the interpreter (it pays per operation),
    one row of up to 4096-column chunks a program on a GPU."""
    br = 16 if INTERPRET else 1
    return (triton.cdiv(M, br),), dict(BLOCK_R=br, num_warps=4 if INTERPRET else 8,
                                       BLOCK_V=min(triton.next_power_of_2(V),
                                                   64 if INTERPRET else 4096))


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target != ignore_index. The forward keeps only the
    (M,) log-sum-exp; the backward writes the gradient (over the logits when inplace)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace):
        M, V = logits.shape
        n_valid = (targets != ignore_index).sum()
        losses = torch.empty(M, device=logits.device, dtype=_stat(logits.dtype))
        lse = torch.empty_like(losses)
        if M:
            grid, kw = _xent_launch(M, V)
            _xent_fwd[grid](logits, targets, losses, lse, logits.stride(0), M, V, ignore_index,
                            ACC=_acc(logits.dtype), **kw)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.inplace, ctx.spent = ignore_index, inplace, False
        return losses.sum() / n_valid  # 0 / 0 = nan when every target is ignored, as torch

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        if ctx.inplace and ctx.spent:  # backward(retain_graph=True) twice: the logits are gone
            raise RuntimeError("cross_entropy(inplace=True) can be differentiated once: its "
                               "backward overwrote the logits; use inplace=False")
        M, V = logits.shape
        ctx.spent = True
        grad = logits if ctx.inplace else torch.empty_like(logits)
        if M:
            grid, kw = _xent_launch(M, V)
            _xent_bwd[grid](logits, targets, lse, grad, n_valid, dloss.contiguous(),
                            logits.stride(0), grad.stride(0), M, V, ctx.ignore_index,
                            ACC=_acc(logits.dtype), **kw)
        return grad, None, None, None


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy(logits, targets, ignore_index=-100, inplace=False):
    """F.cross_entropy(logits, targets, ignore_index=...) (mean), fused, differentiable.

    logits (M, V) float, rows with unit column stride (a slice logits[:, :V] of a wider
    buffer is fine); targets (M,) integers in [0, V) or ignore_index. inplace=True: the
    backward writes the gradient over the logits themselves; use it only when nothing reads
    them after loss.backward() (the training loss), and never on a leaf tensor.
    """
    _check_device("cross_entropy", logits, targets, floats=1)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits (M, V) and targets (M,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if not logits.is_floating_point() or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"cross_entropy wants float logits and integer targets, got "
                         f"{logits.dtype} and {targets.dtype}")
    if logits.size(1) == 0 or (logits.size(1) > 1 and logits.stride(1) != 1):
        raise ValueError("cross_entropy needs a non-empty vocabulary axis with stride 1")
    if inplace and logits.requires_grad and logits.is_leaf:
        raise ValueError("cross_entropy(inplace=True) would overwrite a leaf tensor; "
                         "use inplace=False")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.size(1)))
    if bad.any():  # the kernel would read outside the row: refuse, as torch does
        raise ValueError(f"cross_entropy: targets must be in [0, {logits.size(1)}) or "
                         f"ignore_index={ignore_index}")
    return CrossEntropy.apply(logits, targets, int(ignore_index), bool(inplace))


# ============================================================================ bytes, demo
def loss_bytes(M, V, nbytes=2):
    """{"eager" | "fused": (HBM bytes moved, bytes held from forward to backward)} of the mean
    cross-entropy of (M, V) logits of `nbytes` each, as a bf16 autocast run computes it.
    Eager, forward: cast to fp32 (read 2, write 4 per logit), log_softmax (read 4, write 4,
    kept for backward); backward: the nll gradient (write 4), log_softmax's backward (read 4 + 4,
    write 4), the cast back (read 4, write 2). Fused: read the row in the forward, read it
    again in the backward and write the gradient over it; held: nothing beyond the logits'
    own buffer (which becomes the gradient) and one fp32 per row (neglected).
        >>> loss_bytes(1, 1, 2)
        {'eager': (36, 4), 'fused': (6, 0)}
    """
    n = M * V
    eager = (nbytes + 4) + (4 + 4) + 4 + (4 + 4 + 4) + (4 + nbytes)
    return {"eager": (eager * n, 4 * n), "fused": (3 * nbytes * n, 0)}


def rms_norm_bytes(M, N, nbytes=2):
    """HBM bytes of block.py's written-out RMSNorm forward (pow, mean, rsqrt, two multiplies:
    x is read 3 times, x^2 written and read, the product written and read, y written; the
    (M, 1) statistics neglected) against the fused kernel (read x once, write y once)."""
    return {"eager": 7 * M * N * nbytes, "fused": 2 * M * N * nbytes}


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def demo(dev=None, seed=0):
    """Each kernel against torch on small inputs, then the bytes they save at GPT-2 scale.
    On a CPU it runs under the interpreter (float32): seconds, not speed."""
    dev = torch.device(dev or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = "the Triton interpreter (numpy)" if INTERPRET else str(dev)
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, T, d = 1, 2, 1, 24, 16   # GQA, T not a multiple of the 16-row tile

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev).requires_grad_()

    q, k, v = rand(B, H, T, d), rand(B, Hkv, T, d), rand(B, Hkv, T, d)
    do = torch.randn(B, H, T, d, generator=g).to(dev)
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = (q @ kr.transpose(-1, -2) / math.sqrt(d)).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool, device=dev).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ vr
    o = flash_attention(q, k, v)
    lse = flash_attention(q, k, v, return_lse=True)[1]
    grads = [torch.autograd.grad(y, (q, k, v), do) for y in (o, ref)]
    print(f"on {where}, float32, max |ours - torch|:")
    print(f"  FlashAttention-2 causal, q {tuple(q.shape)}, k/v {tuple(k.shape)} (GQA): output "
          f"{_max_diff([o], [ref]):.1e}, LSE {_max_diff([lse], [torch.logsumexp(s, -1)]):.1e}, "
          f"dq dk dv {_max_diff(*grads):.1e}")
    x, w, b, dy = rand(50, 96), rand(96), rand(96), torch.randn(50, 96, generator=g).to(dev)
    for name, ours, theirs in [
            ("LayerNorm", layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (96,), w, b)),
            ("RMSNorm", rms_norm(x, w), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
             * w)]:
        ins = (x, w, b) if name == "LayerNorm" else (x, w)
        diff = _max_diff(torch.autograd.grad(ours, ins, dy), torch.autograd.grad(theirs, ins, dy))
        print(f"  {name} (50, 96): output {_max_diff([ours], [theirs]):.1e}, gradients {diff:.1e}")
    logits, t = rand(50, 300), torch.randint(0, 300, (50,), generator=g).to(dev)
    t[::4] = -1
    ours, theirs = cross_entropy(logits, t, -1), torch.nn.functional.cross_entropy(
        logits, t, ignore_index=-1)
    diff = _max_diff(*(torch.autograd.grad(y, logits) for y in (ours, theirs)))
    print(f"  cross-entropy (50, 300), ignore_index=-1: loss {_max_diff([ours], [theirs]):.1e}, "
          f"gradient {diff:.1e}")
    M, V, C, GiB = 8 * 1024, 50304, 768, 2**30
    lb, nb = loss_bytes(M, V), rms_norm_bytes(M, C)
    print(f"GPT-2 124M, micro-batch 8 x 1024 tokens, bf16 autocast:\n"
          f"  loss over ({M}, {V}) logits: eager moves {lb['eager'][0] / GiB:.1f} GiB and keeps "
          f"{lb['eager'][1] / GiB:.2f} GiB of fp32 log-probabilities for backward; fused moves "
          f"{lb['fused'][0] / GiB:.1f} GiB and keeps nothing ({lb['eager'][0] / lb['fused'][0]:.0f}x"
          f" less traffic)\n  RMSNorm over ({M}, {C}): written out {nb['eager'] / 2**20:.0f} MiB,"
          f" fused {nb['fused'] / 2**20:.0f} MiB")


def main():
    import cli  # only when run as a script: block.py imports this file, and cli stays out of it
    cli.one_of("device", device, ("auto", "cpu", "cuda"))
    dev = "cuda" if device == "auto" and not INTERPRET else "cpu" if device == "auto" else device
    if (dev == "cuda") == INTERPRET:
        raise ValueError(f"--device={device}: this process runs kernels on "
                         f"{'cpu (TRITON_INTERPRET=1)' if INTERPRET else 'cuda'}")
    demo(dev, seed)


if __name__ == "__main__":
    import cli
    cli.run(main, globals())
