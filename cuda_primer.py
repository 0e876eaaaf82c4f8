"""cuda_primer.py - the GPU performance ideas behind fast LLM training, run and measured.

What you will learn
  1. what your device can do: peak FLOP/s and memory bandwidth (the table lives in train.py);
  2. the roofline, measured: copy bandwidth, matmul FLOP/s, the ridge point between them, and the
     arithmetic intensity (FLOPs per byte moved) of every op of GPT-2 124M: which ops are
     memory-bound, and why fusing them pays;
  3. tiling: a matmul done tile by tile reads global memory 1/tile as often (counted, not assumed);
  4. online softmax and the FlashAttention forward pass, tile by tile in numpy, equal to naive
     attention without ever holding the (T, T) score matrix;
  5. fusion: eager bias + GELU runs one kernel per op, torch.compile fuses them into one pass;
  6. real kernels (GPU only): CUDA C++ through torch.utils.cpp_extension.load_inline (bias+GELU
     in fp32 and bf16, one and eight values per load; a tiled and a tensor-core matmul), and
     Triton; without a GPU, python sass.py shows what they compile to;
  7. torch.profiler: where a forward+backward of the "tiny" GPT spends its time.

Without a GPU the ideas are simulated with counts in numpy and the GPU kernels skip with a
message; on a GPU the same file measures the real thing.

Run it
  python cuda_primer.py                              # everything, ~10-20 s on a 2-core CPU
  python cuda_primer.py --sections=tiling,flash      # only some sections
  python cuda_primer.py --out_dir=out                # plot: out/roofline.png (needs matplotlib)
"""
import cli  # first: a Ctrl-C while torch loads is one line, and --help needs no torch
cli.start(__name__, __file__)

import gc
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt import GPT, PRESETS, train_bytes
from train import PEAK_FLOPS, device_peak

try:  # Triton ships with the CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# demo hyperparameters (python cuda_primer.py --name=value)
device = "auto"          # "auto" (cuda when available), "cpu" or "cuda"
sections = "all"         # comma list of: device,roofline,tiling,flash,fusion,kernels,profile
out_dir = "out"          # folder for roofline.png
repeat = 5               # timed runs per measurement; the median is printed
copy_mb = 0              # buffer of the bandwidth test; 0 = 256 MB on CPU, 1024 MB on GPU
matmul_sizes = ""        # square matmul sizes; "" = 256,512,1024,2048 (CPU), 1024..8192 (GPU)
batch_size = 8           # sequences of block_size tokens in the GPT-2 intensity table
tile_n = 64              # matrix size of the tiled matmul demo
attn_t = 256             # sequence length of the FlashAttention demo
block_q = 64             # FlashAttention tile: query rows ...
block_k = 64             # ... and key columns
fusion_tokens = 0        # rows of the (tokens, 3072) GELU input; 0 = 2048 (CPU), 16384 (GPU)
compile = True           # time torch.compile's fused kernel (on CPU it needs a C++ compiler)
seed = 0

SECTIONS = ("device", "roofline", "tiling", "flash", "fusion", "kernels", "profile")


# ----------------------------------------------------------------------------- timing
# How to time code fairly (bench.py times everything with timed() too):
#   * warm up: first calls allocate memory, pick kernels, compile;
#   * synchronize: a GPU call returns before the GPU is done, so wait for it before reading
#     the clock, and time several calls per reading so the wait (~10 us) does not swamp them;
#   * take turns: run the variants in rounds, so that a change in machine load hits all alike;
#   * report the median: one slow run (another process, the garbage collector) does not move it.

def sync(dev):
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fns, repeat, dev=None, warmup=0, calls=1, gc_on=False):
    """Median seconds per call of each fn() over `repeat` rounds in which the fns take turns,
    and each fn's last result. Python's garbage collector is paused while timing (as timeit
    does) unless gc_on."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            gc.collect()
            if not gc_on:
                gc.disable()
            try:
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(calls):
                    outs[i] = fn()
                sync(dev)
            finally:
                gc.enable()
            times[i].append((time.perf_counter() - t0) / calls)
    return [statistics.median(t) for t in times], outs


def bench(fns, dev):
    """timed() as this file uses it: `repeat` rounds, two warm-up calls, 10 calls per reading
    on a GPU."""
    return timed(fns, repeat, dev, warmup=2, calls=10 if dev.type == "cuda" else 1)


# ----------------------------------------------------------------------------- 1. device
def device_name(dev):
    """The GPU's name (train.device_peak), or the CPU model from /proc/cpuinfo where it exists."""
    if dev.type == "cuda":
        return device_peak(dev)[0]
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return models[0] if models else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def device_report(dev):
    """Print the device, its memory and the peak numbers train.py knows for it."""
    name, peak = device_name(dev), device_peak(dev)[1]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        memory = p.total_memory
        detail = f"{p.multi_processor_count} SMs, compute capability {p.major}.{p.minor}"
    else:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not every OS exposes these
            memory = 0
        detail = f"{torch.get_num_threads()} torch threads"
    print(f"device: {name} ({dev.type}), {memory / 2**30:.0f} GiB memory, {detail}")
    if peak:
        tflops = ", ".join(f"{k} {peak[k] / 1e12:.0f}" for k in ("bf16", "fp32") if peak.get(k))
        print(f"peak from train.PEAK_FLOPS: {tflops} TFLOP/s, bandwidth "
              f"{peak['bandwidth'] / 1e12:.2f} TB/s -> ridge point "
              f"{(peak.get('bf16') or peak['fp32']) / peak['bandwidth']:.0f} FLOP/byte")
    else:
        print(f"no entry for {name!r} in train.PEAK_FLOPS ({len(PEAK_FLOPS)} devices known): "
              "below, measured numbers only")


# ----------------------------------------------------------------------------- 2. roofline
# A kernel needs time for its arithmetic (FLOPs / peak FLOP/s) and for its memory traffic
# (bytes / bandwidth); they overlap, so it takes about the larger of the two. The ratio
# FLOPs / bytes, the arithmetic intensity, decides which: below the ridge point
# peak / bandwidth the kernel waits on memory, above it on the arithmetic units.

def measure_bandwidth(dev, mb):
    """Bytes per second of a large copy: every byte is read once and written once."""
    x = torch.randn(mb * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    (t,), _ = bench([lambda: y.copy_(x)], dev)
    return 2 * x.nbytes / t


def measure_matmul(dev, sizes, dtype):
    """[(n, FLOP/s)] of an (n, n) @ (n, n) matmul: 2 n^3 FLOPs (a multiply and an add each)."""
    rows = []
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        (t,), _ = bench([lambda: a @ b], dev)
        rows.append((n, 2 * n**3 / t))
    return rows


def op_costs(cfg, batch, nbytes):
    """[(op, times per forward, FLOPs, bytes)] for one forward pass of the model of cfg.

    One entry per op of a transformer block in data-flow order, then the lm_head, on `batch`
    sequences of cfg.block_size tokens whose elements are `nbytes` wide (2 for bf16). The bytes
    are the least an unfused kernel must move: each input read once, each output written once.
    Matmul biases (< 0.1% of the bytes) are left out. Elementwise FLOPs are approximate counts
    per element: norm 7 (mean, center, square, sum, scale, weight, bias), softmax 5 (max,
    subtract, exp, sum, divide), GELU 9 (tanh counted as one), residual add 1.
    """
    B, T, C, nh, hd, L = batch, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_layer
    M, H = B * T, cfg.hidden  # M tokens in the batch; H the MLP width

    def matmul(m, k, n, count=1):  # (m, k) @ (k, n), `count` independent ones (e.g. per head)
        return count * 2 * m * k * n, count * nbytes * (m * k + k * n + m * n)

    def elementwise(elements, flops_each, tensors):  # `tensors` reads + writes of that size
        return flops_each * elements, nbytes * tensors * elements

    qkv = (nh + 2 * cfg.kv_heads) * hd
    scores = B * nh * T * T  # the (B, nh, T, T) attention matrix
    n_in = 2 if cfg.mlp == "swiglu" else 1  # SwiGLU has a gate matrix beside c_fc
    act = "SwiGLU" if cfg.mlp == "swiglu" else "GELU"
    qk, pv = matmul(T, hd, T, B * nh), matmul(T, T, hd, B * nh)
    sm = elementwise(scores, 5, 2)
    return [
        (cfg.norm, 2 * L, *elementwise(M * C, 7, 2)),
        ("qkv matmul", L, *matmul(M, C, qkv)),
        ("attention Q K^T", L, *qk),
        ("softmax", L, *sm),
        ("attention P V", L, *pv),
        ("attn out matmul", L, *matmul(M, C, C)),
        ("residual add", 2 * L, *elementwise(M * C, 1, 3)),
        ("MLP in matmul", n_in * L, *matmul(M, C, H)),
        (act, L, *elementwise(M * H, 9, 2 + n_in - 1)),
        ("MLP out matmul", L, *matmul(M, H, C)),
        ("lm_head matmul", 1, *matmul(M, C, cfg.padded_vocab)),
        # FlashAttention fuses Q K^T, softmax and P V: it reads q, k, v and writes the output
        # once, and the (T, T) scores never leave the chip (not summed into the total below)
        ("attention fused (flash)", 0, qk[0] + sm[0] + pv[0], nbytes * B * nh * 4 * T * hd),
    ]


def roofline_table(costs, flops, bw):
    """Print each op's intensity and time at the roofline min(flops, intensity x bw)."""
    ridge = flops / bw
    print(f"{'op':<24} {'x/fwd':>5} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7}  {'bound':<7} "
          f"{'roofline ms':>11}")
    total = {"memory": [0, 0.0], "compute": [0, 0.0]}  # bound -> [FLOPs, seconds] per forward
    for name, count, f, b in costs:
        t = max(f / flops, b / bw)
        bound = "memory" if f / b < ridge else "compute"
        total[bound][0] += count * f
        total[bound][1] += count * t
        print(f"{name:<24} {count:5} {f / 1e9:8.2f} {b / 1e6:8.1f} {f / b:7.1f}  {bound:<7} "
              f"{t * 1e3:11.3f}")
    flops_all = sum(v[0] for v in total.values())
    time_all = sum(v[1] for v in total.values())
    print(f"one forward pass (x/fwd times each op) at the roofline: {time_all * 1e3:.1f} ms; "
          f"memory-bound ops do {total['memory'][0] / flops_all:.1%} of the FLOPs but take "
          f"{total['memory'][1] / time_all:.1%} of the time")
    att = [c for c in costs if c[0] in ("attention Q K^T", "softmax", "attention P V")]
    f, b = sum(c[2] for c in att), sum(c[3] for c in att)
    flash = costs[-1]
    print(f"fusion: attention as 3 kernels moves {b / 1e6:.0f} MB ({f / b:.0f} FLOP/byte); "
          f"fused (flash) {flash[3] / 1e6:.0f} MB ({flash[2] / flash[3]:.0f} FLOP/byte), "
          f"{b / flash[3]:.0f}x less traffic")


def plot_roofline(path, costs, flops, bw, title):
    """Save the roofline with each op on it as a PNG, when matplotlib is installed: returns
    {op name: (intensity, TFLOP/s)} as read back from the points drawn ({} without it)."""
    plt = cli.pyplot()
    if plt is None:
        print("(matplotlib is not installed: no roofline plot; pip install -r requirements.txt)")
        return {}
    x = np.logspace(-2, 4, 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.loglog(x, np.minimum(flops, x * bw) / 1e12, "k-", label="min(peak, intensity x bandwidth)")
    ax.axvline(flops / bw, color="gray", ls=":", label=f"ridge {flops / bw:.0f} FLOP/byte")
    markers = "osD^v<>ph*XP"
    drawn = {}
    for i, (name, _, f, b) in enumerate(costs):  # each op at the best its intensity allows
        point, = ax.plot(f / b, min(flops, f / b * bw) / 1e12, markers[i % len(markers)], label=name)
        drawn[name] = tuple(point.get_xydata()[0].tolist())
    ax.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="attainable TFLOP/s", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    cli.save_figure(plt, fig, path, dpi=120, bbox_inches="tight")
    print(f"roofline plot -> {path}")
    return drawn


def measure_ceilings(dev):
    """(MB copied, copy bytes/s, [(dtype name, n, matmul FLOP/s)]) on dev, the fast dtype first:
    tensor cores make bf16 the GPU's fast path; on a CPU we stay in fp32."""
    mb = copy_mb or (1024 if dev.type == "cuda" else 256)
    sizes = [int(s) for s in matmul_sizes.split(",")] if matmul_sizes else (
        [1024, 2048, 4096, 8192] if dev.type == "cuda" else [256, 512, 1024, 2048])
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if dev.type == "cuda" else \
        {"fp32": torch.float32}
    return mb, measure_bandwidth(dev, mb), [(key, n, fl) for key, dtype in dtypes.items()
                                            for n, fl in measure_matmul(dev, sizes, dtype)]


def roofline(dev):
    peak = device_peak(dev)[1]
    mb, bw, matmuls = measure_ceilings(dev)
    note = f" = {bw / peak['bandwidth']:.0%} of the table's peak" if peak else ""
    print(f"copy of {mb} MB: {bw / 1e9:.1f} GB/s (read + write){note}")
    for key, n, fl in matmuls:
        frac = f" = {fl / peak[key]:.0%} of peak {key}" if peak and peak.get(key) else ""
        print(f"matmul {key} {n:>5}^3: {fl / 1e12:8.3f} TFLOP/s{frac}")
    key = matmuls[0][0]
    flops, nbytes = max(fl for k, _, fl in matmuls if k == key), 2 if key == "bf16" else 4
    print(f"measured ridge point: {flops / 1e12:.3f} TFLOP/s / {bw / 1e9:.1f} GB/s = "
          f"{flops / bw:.1f} FLOP/byte ({key})")
    cfg = PRESETS["gpt2"]
    costs = op_costs(cfg, batch_size, nbytes)
    print(f"\nGPT-2 124M, one forward pass (x/fwd: how often each op runs in it), batch "
          f"{batch_size} x {cfg.block_size} tokens, {nbytes}-byte elements, against the "
          "measured roofline:")
    roofline_table(costs, flops, bw)
    plot_roofline(Path(out_dir) / "roofline.png", costs, flops, bw,
                  f"GPT-2 124M ops on {device_name(dev)}")


# ----------------------------------------------------------------------------- 3. tiling
# A GPU keeps matrices in global memory (HBM, slow) and computes from a small on-chip memory
# (shared memory / registers, fast). Each output tile loads a row strip of A and a column
# strip of B into on-chip memory one tile at a time; bigger tiles reuse each load more often.

def tiled_matmul(A, B, tile):
    """A @ B, one (tile x tile) output block at a time; returns (C, global-memory loads).

    `loads` counts the elements copied from A and B into the fast tile memory.
    """
    M, K = A.shape
    if B.shape[0] != K:
        raise ValueError(f"cannot multiply {A.shape} by {B.shape}")
    N = B.shape[1]
    C = np.zeros((M, N), dtype=np.result_type(A, B))
    loads = 0
    for i in range(0, M, tile):          # one thread block per output tile (i, j)
        for j in range(0, N, tile):
            acc = np.zeros((min(tile, M - i), min(tile, N - j)), dtype=C.dtype)  # registers
            for k in range(0, K, tile):  # march along K, one pair of tiles at a time
                a = A[i:i + tile, k:k + tile]  # load into shared memory
                b = B[k:k + tile, j:j + tile]
                loads += a.size + b.size
                acc += a @ b                   # compute from fast memory only
            C[i:i + tile, j:j + tile] = acc  # one store per output element
    return C, loads


def tiled_loads(M, K, N, tile):
    """The count by formula: every element of A is loaded once per column of output tiles,
    every element of B once per row of them. For tile | M, N this is 2 M N K / tile."""
    return M * K * math.ceil(N / tile) + K * N * math.ceil(M / tile)


def tiling_demo():
    rng = np.random.default_rng(seed)
    n = tile_n
    A, B = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    print(f"({n} x {n}) @ ({n} x {n}); naive (tile 1) loads 2 n^3 = {2 * n**3:,} elements")
    print(f"{'tile':>5} {'loads':>10} {'formula':>10} {'vs naive':>9} {'FLOP/load':>9} "
          f"{'2 fp32 tiles':>12}  equal to A @ B")
    t = 1
    while t <= n:
        C, loads = tiled_matmul(A, B, t)
        ok = np.allclose(C, A @ B)
        print(f"{t:5} {loads:10,} {tiled_loads(n, n, n, t):10,} {loads / (2 * n**3):9.3f} "
              f"{2 * n**3 / loads:9.1f} {2 * t * t * 4:10,} B  {ok}")
        t *= 2
    print("FLOPs per load grow with the tile; the limit is on-chip memory: an H100 SM has "
          "228 KB, so two fp32 tiles of 128 x 128 (128 KB) fit, 256 x 256 do not")


# ----------------------------------------------------------------------------- 4. flash
# softmax needs the max and the sum of a whole row before it can write anything. Online
# softmax keeps a running max m and a running sum l, rescaling l when m grows, so a row can
# be read in blocks. FlashAttention applies the same rescaling to the output accumulator.

def online_softmax(x, block):
    """softmax over the last axis, reading it `block` columns at a time."""
    m = np.full(x.shape[:-1] + (1,), -np.inf)  # running max
    l = np.zeros(x.shape[:-1] + (1,))           # running sum of exp(x - m)
    for s in range(0, x.shape[-1], block):
        xb = x[..., s:s + block]
        m_new = np.maximum(m, xb.max(-1, keepdims=True))
        l = l * np.exp(m - m_new) + np.exp(xb - m_new).sum(-1, keepdims=True)
        m = m_new
    return np.exp(x - m) / l  # a second pass writes the output


def naive_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(d)) v for (..., T, d) arrays: materializes (..., T, T)."""
    T = q.shape[-2]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def attention_bytes(T, heads=4, d=64):
    """Bytes the flash section's numpy arrays take at their peak for sequence length T:
    ~3.5 (heads, T, T) float64 score arrays alive at once in naive_attention (scores, masked,
    exp, probabilities; each freed once the next exists), plus q, k, v, o and flash's tiles.
    test_all checks it with tracemalloc."""
    return int((3.5 * T * T + 8 * T * d) * heads * 8)


def flash_attention(q, k, v, bq, bk):
    """The same causal attention, one (bq, bk) tile of scores at a time (FlashAttention fwd).

    For each block of queries (kept on chip) we stream blocks of keys and values, and keep per
    row a running max m, a running sum l and an unnormalized output acc, rescaled when m grows.
    kernels.py's _attn_fwd is this loop as a Triton kernel, with its backward (phase 5b).
    """
    T, d = q.shape[-2:]
    o = np.empty_like(q)
    for i in range(0, T, bq):
        qi = q[..., i:i + bq, :] / math.sqrt(d)                  # (..., bq, d)
        rows = np.arange(i, i + qi.shape[-2])[:, None]
        m = np.full(qi.shape[:-1] + (1,), -np.inf)
        l = np.zeros(qi.shape[:-1] + (1,))
        acc = np.zeros(qi.shape)
        for j in range(0, i + qi.shape[-2], bk):  # causal: key blocks past the last query skip
            s = qi @ k[..., j:j + bk, :].swapaxes(-1, -2)      # (..., bq, bk), on chip only
            s = np.where(np.arange(j, j + s.shape[-1]) <= rows, s, -np.inf)
            m_new = np.maximum(m, s.max(-1, keepdims=True))   # finite: block 0 sees key 0
            p = np.exp(s - m_new)
            scale = np.exp(m - m_new)                          # shrink what came before
            l = l * scale + p.sum(-1, keepdims=True)
            acc = acc * scale + p @ v[..., j:j + bk, :]
            m = m_new
        o[..., i:i + bq, :] = acc / l
    return o


def flash_demo():
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 1000)) * 10
    ref = np.exp(x - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    print(f"online softmax (blocks of 128) vs two-pass softmax: max |diff| "
          f"{np.abs(online_softmax(x, 128) - ref).max():.1e}")
    nh, T, d = 4, attn_t, 64
    q, k, v = (rng.standard_normal((nh, T, d)) for _ in range(3))
    diff = np.abs(naive_attention(q, k, v) - flash_attention(q, k, v, block_q, block_k)).max()
    print(f"flash ({block_q} x {block_k} tiles) vs naive attention, {nh} heads x {T} tokens x "
          f"{d}: max |diff| {diff:.1e}")
    # what each needs, per head, for GPT-2 124M at its full context in bf16
    cfg = PRESETS["gpt2"]
    T, d, nb = cfg.block_size, cfg.head_dim, 2
    qkvo = 4 * T * d * nb                                 # read q, k, v; write o
    naive_mem = 2 * T * T * nb                            # scores S and probabilities P
    naive_io = qkvo + 2 * naive_mem                       # S, P each written, then read back
    # on chip, fp32: the scores s, q and acc, the k and v tiles, m and l
    tile_mem = (block_q * block_k + 2 * block_q * d + 2 * block_k * d + 2 * block_q) * 4
    flash_io = qkvo + (math.ceil(T / block_q) - 1) * 2 * T * d * nb  # k, v again per q block
    print(f"GPT-2 attention per head (T={T}, d={d}, bf16):\n"
          f"  naive: S and P, (T, T) each, in HBM: {naive_mem / 2**20:.1f} MiB (x {cfg.n_head} "
          f"heads x batch x {cfg.n_layer} layers, kept for backward); HBM traffic "
          f"{naive_io / 2**20:.1f} MiB\n"
          f"  flash: one tile on chip, {tile_mem / 1024:.1f} KiB; in HBM only o and a log-sum-exp"
          f" per row ({T * 4 / 1024:.0f} KiB); HBM traffic at most {flash_io / 2**20:.1f} MiB "
          f"(k, v re-read per block of {block_q} queries, mostly from L2)")


# ----------------------------------------------------------------------------- 5. fusion
def bias_gelu(x, b):
    """GELU(x + b), tanh approximation, written out. In eager PyTorch every op here is its own
    kernel that reads its inputs from memory and writes its output back: ~9 trips over the
    tensor where one would do. Elementwise ops are memory-bound, so trips are the cost."""
    h = x + b
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def bias_gelu_torch(x, b):
    """Two kernels: the add, then torch's own GELU kernel."""
    return F.gelu(x + b, approximate="tanh")


def compare(variants, args, dev, min_bytes):
    """Time the fn(*args) of variants, taking turns, and check each result against the first;
    print and return rows of (name, median seconds, max |diff|, speedup over the first).
    Effective bandwidth = the least bytes the op must move / time."""
    times, outs = bench([lambda fn=fn: fn(*args) for fn in variants.values()], dev)
    rows = []
    for name, t, y in zip(variants, times, outs):
        rows.append((name, t, (y - outs[0]).abs().max().item(), times[0] / t))
        print(f"  {name:<36} {t * 1e3:9.3f} ms {min_bytes / t / 1e9:8.1f} GB/s  "
              f"x{rows[-1][3]:5.2f}  max |diff| {rows[-1][2]:.1e}")
    return rows


def fusion_demo(dev):
    rows = fusion_tokens or (16384 if dev.type == "cuda" else 2048)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(rows, 3072, device=dev, generator=g)  # GPT-2's MLP activation (tokens, 4C)
    b = torch.randn(3072, device=dev, generator=g)
    variants = {"bias + GELU written out (eager)": bias_gelu,
                "x + b, then F.gelu (eager)": bias_gelu_torch}
    if compile:
        try:
            fused = torch.compile(bias_gelu)
            t0 = time.perf_counter()
            fused(x, b)
            print(f"torch.compile built the fused kernel in {time.perf_counter() - t0:.1f} s")
            variants["torch.compile (one fused kernel)"] = fused
        except Exception as e:  # no compiler, unsupported platform...: say so and go on
            msg = " ".join(str(e).split())[:200]
            print(f"torch.compile failed here ({type(e).__name__}: {msg}); "
                  "skipping the fused timing")
    print(f"bias + GELU on ({rows}, 3072) float32, speedup vs the first line:")
    return compare(variants, (x, b), dev, min_bytes=2 * x.nbytes)


# ----------------------------------------------------------------------------- 6. kernels
# Four CUDA C++ kernels, each one idea. On a GPU load_inline compiles them with nvcc and binds
# them as Python functions; without one, sass.py compiles the same source for a GPU and reads
# what the GPU would run (registers, load widths, shared memory, tensor-core instructions).
#   bias_gelu_kernel   fp32, one thread per element: one read of x, one write of y
#   bias_gelu_bf16     bf16, one element per thread: 2-byte loads, 16x more load instructions
#                      than bytes need (SASS: LDG.E.U16)
#   bias_gelu_bf16x8   bf16, 8 elements per thread in one 16-byte load and store (LDG.E.128)
#   matmul_tiled       fp32 C = A @ B through shared memory, TILE x TILE tiles: each element of
#                      A and B is read from global memory N / TILE times, not N (LDS, BAR.SYNC)
#   matmul_wmma        bf16 in, fp32 out on the tensor cores: one warp, one 16 x 16 tile of C,
#                      the WMMA API (mma_sync becomes HMMA instructions)
CUDA_KERNELS = r"""
#include <cuda_bf16.h>
#include <mma.h>

__device__ __forceinline__ float gelu(float h) {  // tanh approximation, as F.gelu(tanh)
    return 0.5f * h * (1.0f + tanhf(0.7978845608f * (h + 0.044715f * h * h * h)));
}

__global__ void bias_gelu_kernel(const float* __restrict__ x, const float* __restrict__ b,
                                 float* __restrict__ y, long n, long cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // this thread's element
    if (i >= n) return;                                    // the last block overhangs
    y[i] = gelu(x[i] + b[i % cols]);
}

__global__ void bias_gelu_bf16(const __nv_bfloat16* __restrict__ x,
                               const __nv_bfloat16* __restrict__ b,
                               __nv_bfloat16* __restrict__ y, long n, long cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = __float2bfloat16(gelu(__bfloat162float(x[i]) + __bfloat162float(b[i % cols])));
}

// x, b, y seen as uint4 (16 bytes = 8 bf16): needs cols % 8 == 0 and 16-byte aligned tensors
__global__ void bias_gelu_bf16x8(const uint4* __restrict__ x, const uint4* __restrict__ b,
                                 uint4* __restrict__ y, long n8, long cols8) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // this thread's 8 elements
    if (i >= n8) return;
    uint4 xv = x[i], bv = b[i % cols8], yv;                // one 128-bit load each
    const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv);
    const __nv_bfloat162* bp = reinterpret_cast<const __nv_bfloat162*>(&bv);
    __nv_bfloat162* yp = reinterpret_cast<__nv_bfloat162*>(&yv);
    for (int j = 0; j < 4; j++) {                          // 4 pairs of bf16
        float2 xf = __bfloat1622float2(xp[j]), bf = __bfloat1622float2(bp[j]);
        yp[j] = __floats2bfloat162_rn(gelu(xf.x + bf.x), gelu(xf.y + bf.y));
    }
    y[i] = yv;                                             // one 128-bit store
}

#define TILE 16
// C (M, N) = A (M, K) @ B (K, N), fp32 row-major; blocks of TILE x TILE threads, one per C entry
__global__ void matmul_tiled(const float* __restrict__ A, const float* __restrict__ B,
                             float* __restrict__ C, int M, int N, int K) {
    __shared__ float As[TILE][TILE], Bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < K; t += TILE) {
        // each thread brings one element of each tile on chip...
        As[ty][tx] = (row < M && t + tx < K) ? A[(long)row * K + t + tx] : 0.0f;
        Bs[ty][tx] = (t + ty < K && col < N) ? B[(long)(t + ty) * N + col] : 0.0f;
        __syncthreads();                                   // ...the whole tile is loaded
        for (int k = 0; k < TILE; k++)                     // TILE multiply-adds from shared
            acc += As[ty][k] * Bs[k][tx];
        __syncthreads();                                   // done reading before overwriting
    }
    if (row < M && col < N) C[(long)row * N + col] = acc;
}

// C (M, N) fp32 = A (M, K) @ B (K, N) bf16 row-major, M, N, K multiples of 16; one warp (32
// threads) per block computes one 16 x 16 tile of C on the tensor cores
__global__ void matmul_wmma(const __nv_bfloat16* __restrict__ A,
                            const __nv_bfloat16* __restrict__ B, float* __restrict__ C,
                            int M, int N, int K) {
    using namespace nvcuda;
    long tm = blockIdx.y * 16, tn = blockIdx.x * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (int k = 0; k < K; k += 16) {                      // the warp loads two 16 x 16 tiles
        wmma::load_matrix_sync(a, A + tm * K + k, K);
        wmma::load_matrix_sync(b, B + (long)k * N + tn, N);
        wmma::mma_sync(c, a, b, c);                        // c += a @ b: tensor-core MMAs
    }
    wmma::store_matrix_sync(C + tm * N + tn, c, N, wmma::mem_row_major);
}
"""
CUDA_NAMES = ("bias_gelu_kernel", "bias_gelu_bf16", "bias_gelu_bf16x8", "matmul_tiled",
              "matmul_wmma")

CUDA_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
""" + CUDA_KERNELS + r"""
torch::Tensor bias_gelu(torch::Tensor x, torch::Tensor b) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "x must be a contiguous float32 CUDA tensor");
    TORCH_CHECK(b.is_cuda() && b.scalar_type() == torch::kFloat32 && b.is_contiguous()
                && b.dim() == 1 && b.size(0) == x.size(-1), "b must be float32 (x.size(-1),)");
    auto y = torch::empty_like(x);
    long n = x.numel();
    int threads = 256;
    long blocks = (n + threads - 1) / threads;
    bias_gelu_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<float>(), b.data_ptr<float>(), y.data_ptr<float>(), n, x.size(-1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// bias + GELU in bf16: vec8 = 8 elements per thread in 16-byte loads, else one per thread
torch::Tensor bias_gelu_bf16_run(torch::Tensor x, torch::Tensor b, bool vec8) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
                "x must be a contiguous bfloat16 CUDA tensor");
    TORCH_CHECK(b.is_cuda() && b.scalar_type() == torch::kBFloat16 && b.is_contiguous()
                && b.dim() == 1 && b.size(0) == x.size(-1), "b must be bfloat16 (x.size(-1),)");
    TORCH_CHECK(!vec8 || (x.size(-1) % 8 == 0 && (uintptr_t)x.data_ptr() % 16 == 0
                          && (uintptr_t)b.data_ptr() % 16 == 0),
                "the 8-wide kernel needs rows of a multiple of 8 and 16-byte aligned tensors");
    auto y = torch::empty_like(x);
    long n = x.numel(), per = vec8 ? 8 : 1;
    if (n == 0) return y;
    int threads = 256;
    long blocks = (n / per + threads - 1) / threads;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (vec8)
        bias_gelu_bf16x8<<<blocks, threads, 0, stream>>>(
            (const uint4*)x.data_ptr(), (const uint4*)b.data_ptr(), (uint4*)y.data_ptr(),
            n / 8, x.size(-1) / 8);
    else
        bias_gelu_bf16<<<blocks, threads, 0, stream>>>(
            (const __nv_bfloat16*)x.data_ptr(), (const __nv_bfloat16*)b.data_ptr(),
            (__nv_bfloat16*)y.data_ptr(), n, x.size(-1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// a @ b -> fp32: tensor_cores = WMMA on bf16 (sizes multiples of 16), else the fp32 tiled kernel
torch::Tensor matmul_run(torch::Tensor a, torch::Tensor b, bool tensor_cores) {
    TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.dim() == 2 && b.dim() == 2
                && a.size(1) == b.size(0) && a.is_contiguous() && b.is_contiguous(),
                "a (M, K) and b (K, N) must be contiguous CUDA matrices");
    auto want = tensor_cores ? torch::kBFloat16 : torch::kFloat32;
    TORCH_CHECK(a.scalar_type() == want && b.scalar_type() == want,
                tensor_cores ? "the WMMA kernel takes bfloat16" : "the tiled kernel takes float32");
    int M = a.size(0), K = a.size(1), N = b.size(1);
    TORCH_CHECK(!tensor_cores || (M % 16 == 0 && N % 16 == 0 && K % 16 == 0),
                "the WMMA kernel needs M, N, K multiples of 16");
    auto c = torch::empty({M, N}, a.options().dtype(torch::kFloat32));
    if (M == 0 || N == 0) return c;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (tensor_cores)  // one warp per 16 x 16 tile of C
        matmul_wmma<<<dim3(N / 16, M / 16), 32, 0, stream>>>(
            (const __nv_bfloat16*)a.data_ptr(), (const __nv_bfloat16*)b.data_ptr(),
            c.data_ptr<float>(), M, N, K);
    else               // TILE x TILE threads per TILE x TILE tile of C
        matmul_tiled<<<dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), dim3(TILE, TILE),
                       0, stream>>>(a.data_ptr<float>(), b.data_ptr<float>(),
                                    c.data_ptr<float>(), M, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return c;
}
"""
CUDA_DECLS = """torch::Tensor bias_gelu(torch::Tensor x, torch::Tensor b);
torch::Tensor bias_gelu_bf16_run(torch::Tensor x, torch::Tensor b, bool vec8);
torch::Tensor matmul_run(torch::Tensor a, torch::Tensor b, bool tensor_cores);"""


def cuda_extension():
    """Compile (first time: ~1 min, then cached) the CUDA kernels above; the module has
    bias_gelu(x, b) (fp32), bias_gelu_bf16_run(x, b, vec8) and matmul_run(a, b, tensor_cores)."""
    from torch.utils.cpp_extension import load_inline
    return load_inline(name="primer_kernels", cuda_sources=CUDA_SRC, cpp_sources=CUDA_DECLS,
                       functions=["bias_gelu", "bias_gelu_bf16_run", "matmul_run"],
                       extra_cuda_cflags=["-O3"])


def cuda_bias_gelu():
    """The fp32 CUDA bias_gelu function of cuda_extension()."""
    return cuda_extension().bias_gelu


if triton is not None:
    @triton.jit
    def softmax_kernel(x_ptr, y_ptr, n_cols, stride, BLOCK: tl.constexpr):
        """One program per row: load the row once, max, exp, sum, divide on chip, store once."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)  # BLOCK is a power of two >= n_cols; mask the rest
        x = tl.load(x_ptr + row * stride + cols, mask=cols < n_cols, other=-float("inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(y_ptr + row * stride + cols, e / tl.sum(e, axis=0), mask=cols < n_cols)


def triton_softmax(x):
    """Row-wise softmax of a contiguous 2-D CUDA tensor with the Triton kernel above."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"triton_softmax wants a contiguous 2-D tensor, got {tuple(x.shape)}")
    y = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    softmax_kernel[(x.shape[0],)](x, y, x.shape[1], x.stride(0), BLOCK=block,
                                  num_warps=8 if block >= 2048 else 4)
    return y


def softmax_unfused(x):
    """The textbook formula, four kernels: max, subtract + exp, sum, divide."""
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kernels_lesson(dev):
    """kernels.py (phase 5b: FlashAttention-2, norms, fused loss) against torch, if it can run."""
    try:
        import kernels
    except ImportError as e:
        print(f"skipped kernels.py: {e}")
        return
    if kernels.INTERPRET == (dev.type == "cuda"):
        print(f"skipped kernels.py: on {dev.type} with TRITON_INTERPRET={int(kernels.INTERPRET)}")
        return
    kernels.demo(dev)


def kernels_demo(dev):
    """Time the CUDA and Triton kernels against torch; return compare()'s rows."""
    if dev.type != "cuda":
        print("skipped: the CUDA C++ and Triton kernels need a CUDA GPU (this run is on "
              f"{dev.type}); sections 3-5 show the same ideas on the CPU")
        kernels_lesson(dev)  # kernels.py's Triton kernels, checked under the interpreter
        return []
    rows = []
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(16384, 3072, device=dev, generator=g)
    b = torch.randn(3072, device=dev, generator=g)
    try:
        t0 = time.perf_counter()
        ext = cuda_extension()
        print(f"CUDA kernels built by load_inline in {time.perf_counter() - t0:.1f} s")
        print("bias + GELU on (16384, 3072) float32, speedup vs the first line:")
        rows += compare({"F.gelu(x + b) (torch, 2 kernels)": bias_gelu_torch,
                         "bias + GELU written out (eager)": bias_gelu,
                         "CUDA C++ kernel (load_inline)": ext.bias_gelu}, (x, b), dev,
                        2 * x.nbytes)
        xh, bh = x.bfloat16(), b.bfloat16()
        print("bias + GELU in bfloat16 (python sass.py shows their loads), vs the first line:")
        rows += compare({"F.gelu(x + b) (torch, 2 kernels)": bias_gelu_torch,
                         "CUDA, one bf16 per load": lambda x, b: ext.bias_gelu_bf16_run(x, b, 0),
                         "CUDA, 8 bf16 per 16-byte load":
                             lambda x, b: ext.bias_gelu_bf16_run(x, b, 1)}, (xh, bh), dev,
                        2 * xh.nbytes)
        a, w = torch.randn(2048, 768, device=dev, generator=g), torch.randn(768, 3072,
                                                                            device=dev, generator=g)
        print("(2048, 768) @ (768, 3072) -> fp32, vs the first line (the diff of WMMA is bf16's):")
        rows += compare({"torch fp32 (cuBLAS)": lambda a, w: a @ w,
                         "CUDA tiled, shared memory, fp32": lambda a, w: ext.matmul_run(a, w, 0),
                         "CUDA WMMA, tensor cores, bf16 in": lambda a, w: ext.matmul_run(
                             a.bfloat16(), w.bfloat16(), 1)}, (a, w), dev,
                        4 * (a.numel() + w.numel() + 2048 * 3072))
    except (RuntimeError, OSError, ImportError) as e:  # no nvcc or ninja, a compiler error
        print(f"skipped the CUDA C++ kernel, it failed to build or run: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]}")
    if triton is None:
        print("skipped the Triton kernel: triton is not installed")
        return rows
    # the rows of GPT-2's attention matrix: T = 1024 scores each
    s = torch.randn(32768, 1024, device=dev, generator=g)
    kernels_lesson(dev)
    print("softmax over (32768, 1024) float32 rows, speedup vs the first line:")
    return rows + compare({"torch.softmax": lambda s: torch.softmax(s, -1),
                           "softmax written out (eager)": softmax_unfused,
                           "Triton kernel (one pass)": triton_softmax}, (s,), dev, 2 * s.nbytes)


# ----------------------------------------------------------------------------- 7. profile
def profile_demo(dev):
    """A table of the ops where a forward + backward of the "tiny" GPT spends its time."""
    from torch.profiler import ProfilerActivity, profile
    cfg = PRESETS["tiny"]
    torch.manual_seed(seed)
    model = GPT(cfg).to(dev)
    idx = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size), device=dev)

    def step():
        _, loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first calls allocate and pick kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"tiny GPT ({model.num_params():,} params), batch {batch_size} x {cfg.block_size}, "
          f"one forward + backward, top ops by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


def check_options():
    """Every option's range before any work: one line naming it (cli.check, cli.one_of), and
    on the CPU the sizes this machine cannot hold, with what they would need. Returns
    (chosen sections, device)."""
    chosen = SECTIONS if sections == "all" else tuple(s.strip() for s in sections.split(","))
    for name in chosen:
        cli.one_of("section", name, SECTIONS)
    cli.one_of("device", device, ("auto", "cpu", "cuda"))
    sizes = matmul_sizes.split(",") if matmul_sizes else []
    cli.check(globals(), [
        ("device", device != "cuda" or torch.cuda.is_available(), "auto or cpu: torch sees no GPU"),
        ("out_dir", out_dir != "", "a folder name"), ("repeat", repeat >= 1, "at least 1"),
        ("copy_mb", copy_mb >= 0, ">= 0 (0 = the default)"),
        ("matmul_sizes", all(s.strip().isascii() and s.strip().isdigit() and int(s) > 0 for s in sizes),
         "positive integers like 512,1024"),
        ("batch_size", batch_size >= 1, "at least 1"),
        ("tile_n", 1 <= tile_n <= 128,
         "between 1 and 128 (its tile-1 pass is n^3 Python steps: 2.1 M at 128)"),
        ("attn_t", attn_t >= 1, "at least 1"),
        ("block_q", block_q >= 1, "at least 1"), ("block_k", block_k >= 1, "at least 1"),
        ("fusion_tokens", fusion_tokens >= 0, ">= 0 (0 = the default)"), ("seed", seed >= 0, ">= 0")])
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cpu":  # the OOM killer would end the run without a word
        need = {f"--attn_t={attn_t}": attention_bytes(attn_t),
                f"--copy_mb={copy_mb}": 2 * (copy_mb or 256) * 2**20,  # source and copy
                **{f"--matmul_sizes={n}": 3 * 4 * int(n) ** 2 for n in sizes},  # a, b, a @ b
                # the input, 3 results kept to compare, and the eager version's temporaries
                f"--fusion_tokens={fusion_tokens}": 8 * 4 * 3072 * (fusion_tokens or 2048),
                f"--batch_size={batch_size}": train_bytes(PRESETS["tiny"], batch_size)}
        for what, nbytes in need.items():
            cli.fits_in_memory(nbytes, what)
    return chosen, dev


def main():
    chosen, dev = check_options()
    torch.manual_seed(seed)
    steps = {"device": device_report, "roofline": roofline,
             "tiling": lambda dev: tiling_demo(), "flash": lambda dev: flash_demo(),  # numpy
             "fusion": fusion_demo, "kernels": kernels_demo, "profile": profile_demo}
    for i, section in enumerate(SECTIONS, 1):
        if section in chosen:
            print(f"\n== {i}. {section} " + "=" * 60)
            t0 = time.perf_counter()
            steps[section](dev)
            print(f"({section}: {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    cli.run(main, globals())
