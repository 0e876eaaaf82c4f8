"""sass.py - what your kernel becomes: compile every kernel for real GPUs on a CPU and read it.
Phase 5c: read it after kernels.py. No GPU needed: Triton and nvcc compile for a GPU they do
not have, and the cubin they write says what that GPU will run.

What you will learn
  * a kernel's resource bill: registers per thread, spills to local memory (slow, per-thread
    memory in DRAM), shared memory per block, against the limits of each GPU generation;
  * occupancy: how many warps an SM can keep resident at once, and which resource caps it
    (registers, shared memory, or the warp / block slots): occupancy() below, worked by hand
    in docs/kernels.md;
  * SASS, the GPU's own instructions: whether tl.dot became tensor-core instructions (HMMA,
    HGMMA), how wide a global load is (LDG.E.128 = 16 bytes a thread), shared memory traffic
    (LDS / STS / LDSM) and barriers (BAR.SYNC);
  * CUDA C++ the same way: the primer's bias+GELU one bf16 per load against eight per load,
    a shared-memory tiled matmul, a tensor-core (WMMA) one.

Run it
  python sass.py                       # the GPU present, else sm_89 (RTX 40xx)
  python sass.py --target=sm_90        # H100; also sm_80, sm_86, sm_120; --target=all
  python sass.py --dtypes=fp16         # the Triton kernels in fp16 (default: bf16,fp32)
  python sass.py --show=matmul_wmma    # also print that kernel's SASS (a name from the table)
Needs triton (pip install triton) and, for the CUDA C++ rows, nvcc from PyPI wheels:
  pip install nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl

The dozen SASS instructions the table counts (LDG.E.128, HMMA, HGMMA, LDS, BAR.SYNC, ...) are
explained in docs/kernels.md ("SASS glossary"), with this file's numbers for every GPU.
"""
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import cli

# options (python sass.py --name=value)
target = "auto"          # sm_80, sm_86, sm_89, sm_90, sm_120, "all"; "auto": the GPU, else sm_89
dtypes = "bf16,fp32"     # the Triton kernels' dtypes: bf16 and fp32 as the model runs them; fp16
show = ""                # a kernel name: also print its SASS for the (first) target

# Per SM limits, from the CUDA C++ Programming Guide's table of compute capabilities.
# regs: 32-bit registers per SM; max_regs: per thread; smem: shared memory per SM (bytes, the
# largest carve-out); smem_block: the most one block may ask for; warps / blocks: resident max.
LIMITS = {
    "sm_80": dict(gpu="A100", regs=65536, max_regs=255, smem=167936, smem_block=166912,
                  warps=64, blocks=32),
    "sm_86": dict(gpu="RTX 30xx", regs=65536, max_regs=255, smem=102400, smem_block=101376,
                  warps=48, blocks=16),
    "sm_89": dict(gpu="RTX 40xx / L4", regs=65536, max_regs=255, smem=102400, smem_block=101376,
                  warps=48, blocks=24),
    "sm_90": dict(gpu="H100 / H200", regs=65536, max_regs=255, smem=233472, smem_block=232448,
                  warps=64, blocks=32),
    "sm_120": dict(gpu="RTX 50xx", regs=65536, max_regs=255, smem=131072, smem_block=101376,
                   warps=48, blocks=32),
}
REG_UNIT = 256           # registers are handed to a warp in chunks of 256 (8 per thread)
SMEM_UNIT = 128          # shared memory is handed to a block in chunks of 128 bytes
SMEM_RESERVED = 1024     # bytes the system keeps per block (sm_80 and later)
TENSOR_OPS = ("HMMA", "HGMMA", "IMMA", "QMMA", "OMMA", "UTCHMMA", "UTCQMMA")


def occupancy(regs, smem, warps_per_block, lim):
    """(resident warps per SM, the limiter, blocks per SM by each limit) for a block of
    warps_per_block warps using regs registers per thread and smem bytes of shared memory."""
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT                  # round up to 256
    per_block = -(-(smem + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    by = {"registers": lim["regs"] // per_warp // warps_per_block,
          "shared": lim["smem"] // per_block,
          "warps": lim["warps"] // warps_per_block,
          "blocks": lim["blocks"]}
    limiter = min(by, key=by.get)                                    # first of equals wins
    return by[limiter] * warps_per_block, limiter, by


def parse_resources(text):
    """{"regs", "spill", "static_smem"} from `cuobjdump -res-usage` output (one kernel)."""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise ValueError(f"cuobjdump printed no resource line: {text[:200]!r}")
    return {"regs": int(m[1]), "spill": int(m[4]), "static_smem": int(m[3])}


def sass_counts(sass):
    """{"tensor": {op: count}, "widest_load": bits of the widest global load (LDG, cp.async or
    a generic LD; 0 when none), "tma": count of TMA loads, "lds", "sts", "ldsm", "bar": counts}."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    heads = Counter(op.split(".")[0] for op in ops)          # HMMA.16816.F32.BF16 -> HMMA
    # LD: a generic load (the pointer might be shared or global, e.g. WMMA's load_matrix_sync)
    widths = [_load_bits(op) for op in ops if op.split(".")[0] in ("LDG", "LDGSTS", "LD")]
    return {"tensor": {op: heads[op] for op in TENSOR_OPS if heads[op]},
            "widest_load": max(widths, default=0), "tma": heads["UTMALDG"], "lds": heads["LDS"],
            "sts": heads["STS"], "ldsm": heads["LDSM"],
            "bar": sum(op.startswith("BAR.SYNC") for op in ops)}


def _load_bits(op):
    parts = op.split(".")
    for p, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if p in parts:
            return bits
    return 32


# ----------------------------------------------------------------------------- the compilers
TRITON_HELP = "pip install triton"
NVCC_HELP = ("pip install nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime "
             "nvidia-cuda-cccl")


def _tools():
    """(cuobjdump path, nvcc path or None) or an ImportError naming what to install."""
    try:
        import triton
    except ImportError:
        raise ImportError(f"sass.py needs triton: {TRITON_HELP}") from None
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        raise ImportError(f"this triton has no {cuobjdump}: {TRITON_HELP} (Linux wheels)")
    cuda = _nvcc_home()
    return str(cuobjdump), (str(cuda / "bin" / "nvcc") if cuda else None)


def _nvcc_home():
    """The folder of the nvidia-cuda-nvcc wheel (bin/nvcc, include/), or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for home in sorted(Path(root).glob("cu*")) + [Path(root) / "cuda_nvcc"]:
            if (home / "bin" / "nvcc").exists():
                return home
    return None


def read_cubin(cubin, cuobjdump):
    """{function name: (resources, its SASS)} of a cubin, via the cuobjdump of triton's wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res, sass = (subprocess.run([cuobjdump, flag, str(path)], capture_output=True,
                                    text=True, check=True).stdout
                     for flag in ("-res-usage", "-sass"))
    usage = dict(re.findall(r"Function (\S+):\n(.*)", res))
    code = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
    return {name: (parse_resources(line), code.get(name, "")) for name, line in usage.items()}


def compile_cuda(source, arch, nvcc):
    """The cubin of CUDA C++ source for arch (e.g. "sm_89"), by nvcc from the PyPI wheels."""
    home = Path(nvcc).parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(source)
        r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", f"-I{home / 'include'}",
                            f"-I{home / 'include' / 'cccl'}", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"nvcc -arch={arch} failed: {r.stderr.strip()[:500]}")
        return out.read_bytes()


# ----------------------------------------------------------------------------- Triton kernels
# Each kernel's arguments by name: these point at the data (of the dtype compiled), these at
# fp32 statistics, these at int64 indices, these are scalars (of their own type); every other
# one is an i32.
DATA = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "X", "Y", "DY", "DX", "LOGITS", "GRAD",
        "x_ptr", "y_ptr"}
STATS = {"LSE", "DELTA", "MEAN", "RSTD", "DW", "DB", "LOSS", "W", "B", "DLOSS"}
INDEX = {"TARGETS", "NVALID"}
SCALARS = {"scale": "fp64", "eps": "fp32"}  # attention's scale travels in float64 (kernels.py)
# Triton's launcher compiles an int argument that is a multiple of 16 as one (and a pointer as
# 16-byte aligned, which torch's allocations are): that is what lets loads widen to 128 bits.
# These are multiples of 16 at GPT-2's shapes (head dim 64, T = 1024, rows of 768 and 50,304).
ALIGNED = {"sqb", "sqh", "sqt", "skb", "skh", "skt", "svb", "svh", "svt", "sob", "soh", "sot",
           "sdb", "sdh", "sdt", "T", "S", "D", "sx", "sy", "sdy", "sdx", "M", "N", "sl", "sg",
           "stride", "n_cols"}
TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def triton_kernels(cc, dtype, head_dims=(64, 128)):
    """[(name, jit function, constexprs, num_warps, num_stages)]: every kernel of kernels.py
    and the primer's softmax, launched as they launch them on a GPU of compute capability cc
    (GPT-2's shapes: rows of 768 for the norms, the 50,257-token vocabulary for the loss)."""
    import triton.language as tl
    import cuda_primer
    import kernels
    acc, rows = tl.float32, []
    if dtype != "fp32":  # attention runs in bf16 / fp16 (autocast); its fp32 path is for tests
        for d in head_dims:
            bm, bn, warps, stages = kernels.flash_tiles(d, cc)
            tiles = dict(CAUSAL=True, IEEE=False, ACC=acc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d)
            for fn in (kernels._attn_fwd, kernels._attn_bwd_dkdv, kernels._attn_bwd_dq):
                rows.append((f"{fn.__name__} d={d}", fn, tiles, warps, stages))
            rows.append((f"_attn_bwd_delta d={d}", kernels._attn_bwd_delta,
                         dict(ACC=acc, BLOCK_M=bm, BLOCK_D=d), 4, 3))
    block = 1024                                       # triton.next_power_of_2(768)
    norm = dict(RMS=False, HAS_B=True, ACC=acc, BLOCK_R=kernels._row_block(block), BLOCK=block)
    rows += [("_norm_fwd", kernels._norm_fwd, norm, kernels._warps(block), 3),
             ("_norm_bwd", kernels._norm_bwd, norm, kernels._warps(block), 3),
             ("_xent_fwd", kernels._xent_fwd, dict(ACC=acc, BLOCK_R=1, BLOCK_V=4096), 8, 3),
             ("_xent_bwd", kernels._xent_bwd, dict(ACC=acc, BLOCK_R=1, BLOCK_V=4096), 8, 3),
             ("softmax_kernel", cuda_primer.softmax_kernel, dict(BLOCK=block), 4, 3)]
    return rows


def compile_triton(fn, dtype, constexprs, cc, warps, stages):
    """The compiled kernel (asm: ttir, ttgir, llir, ptx, cubin; metadata.shared) for a GPU of
    compute capability cc, without that GPU. Needs a process without TRITON_INTERPRET=1."""
    import triton
    from triton.backends.compiler import GPUTarget
    names = fn.arg_names
    sig = {}
    for n in names:
        data = n in DATA and not (n == "V" and "LOGITS" in names)  # _xent's V: vocab size
        sig[n] = ("constexpr" if n in constexprs else f"*{TYPES[dtype]}" if data else
                  "*fp32" if n in STATS else "*i64" if n in INDEX else
                  SCALARS[n] if n in SCALARS else "i32")
    hint = [["tt.divisibility", 16]]
    attrs = {(i,): hint for i, n in enumerate(names) if sig[n][0] == "*" or n in ALIGNED}
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc[0] * 10 + cc[1], 32),
                          options=dict(num_warps=warps, num_stages=stages))


# ----------------------------------------------------------------------------- the report
# CUDA C++ kernels of the primer: (dtype, threads per block as the launch uses them)
CUDA_LAUNCH = {"bias_gelu_kernel": ("fp32", 256), "bias_gelu_bf16": ("bf16", 256),
               "bias_gelu_bf16x8": ("bf16", 256), "matmul_tiled": ("fp32", 256),
               "matmul_wmma": ("bf16", 32)}


def row(kernel, dtype, res, smem, warps, sass_text, arch):
    """One line of the table as a dict: resources, SASS counts and occupancy on arch."""
    lim = LIMITS[arch]
    resident, limiter, _ = occupancy(res["regs"], smem, warps, lim)
    return dict(kernel=kernel, dtype=dtype, target=arch, regs=res["regs"], spill=res["spill"],
                smem=smem, smem_limit=lim["smem_block"], warps=warps, resident=resident,
                max_warps=lim["warps"], limiter=limiter, **sass_counts(sass_text))


def _triton_job(job):
    """Compile one Triton kernel (a worker process's job): its row and its SASS."""
    arch, dtype, i, head_dims = job
    cuobjdump, _ = _tools()
    cc = _cc(arch)
    name, fn, constexprs, warps, stages = triton_kernels(cc, dtype, head_dims)[i]
    k = compile_triton(fn, dtype, constexprs, cc, warps, stages)
    (res, code), = read_cubin(k.asm["cubin"], cuobjdump).values()
    return row(name, dtype, res, k.metadata.shared + res["static_smem"], warps, code, arch), code


def _cuda_job(arch):
    import cuda_primer
    cuobjdump, nvcc = _tools()
    funcs = read_cubin(compile_cuda(cuda_primer.CUDA_KERNELS, arch, nvcc), cuobjdump)
    out = []
    for name, (dtype, threads) in CUDA_LAUNCH.items():
        mangled = next(f for f in funcs if f.startswith(f"_Z{len(name)}{name}"))
        res, code = funcs[mangled]
        out.append((row(name, dtype, res, res["static_smem"], threads // 32, code, arch), code))
    return out


def report(archs, dtypes=("bf16", "fp16", "fp32"), head_dims=(64, 128), cuda=True,
           workers=None):
    """[(row, SASS)] for every Triton kernel in dtypes and (if cuda and nvcc is installed)
    every CUDA C++ kernel, compiled for each arch; the compiles share `workers` processes."""
    # the kernels must be decorated for the compiler, not the interpreter (kernels.py turns
    # the interpreter on when torch sees no GPU, unless the variable is already set)
    interpreted = getattr(sys.modules.get("kernels"), "INTERPRET", False)
    if os.environ.setdefault("TRITON_INTERPRET", "0") not in ("", "0") or interpreted:
        raise ValueError("sass.py compiles for a GPU: run it in a process without "
                         "TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said aloud
    _, nvcc = _tools()
    jobs = [(a, dt, i) for a in archs for dt in dtypes
            for i in range(len(triton_kernels(_cc(a), dt, head_dims)))]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        nv = [pool.submit(_cuda_job, a) for a in archs] if nvcc and cuda else []
        rows = list(pool.map(_triton_job, [(*job, head_dims) for job in jobs]))
        for f in nv:
            rows += f.result()
    return rows


def _cc(arch):
    return int(arch[3:-1]), int(arch[-1])


def print_table(rows, arch):
    lim = LIMITS[arch]
    print(f"{arch} ({lim['gpu']}): {lim['regs']:,} registers, {lim['smem'] // 1024} KB shared "
          f"memory ({lim['smem_block'] // 1024} KB a block), {lim['warps']} warps and "
          f"{lim['blocks']} blocks per SM")
    print(f"  {'kernel':<24} {'dtype':<5} {'regs':>4} {'spill':>5} {'shared KB':>9} "
          f"{'tensor-core ops':<16} {'widest load':<11} {'warps/SM':>8}  limiter")
    for r in rows:
        tensor = ", ".join(f"{n} {c}" for n, c in r["tensor"].items()) or "-"
        load = f"{r['widest_load']} bit" if r["widest_load"] else "-"
        if r["tma"]:
            load += " + TMA"
        print(f"  {r['kernel']:<24} {r['dtype']:<5} {r['regs']:>4} {r['spill']:>5} "
              f"{r['smem'] / 1024:>9.1f} {tensor:<16} {load:<11} "
              f"{r['resident']:>3} / {r['max_warps']:<2}  {r['limiter']}")


def main():
    cli.one_of("target", target, ["all", "auto", *LIMITS])
    chosen = tuple(d.strip() for d in dtypes.split(","))
    for d in chosen:
        cli.one_of("dtype", d, list(TYPES))
    archs = (list(LIMITS) if target == "all" else [_default_arch()] if target == "auto" else
             [target])
    cuobjdump, nvcc = _tools()
    if nvcc is None:
        print(f"(no nvcc: the CUDA C++ rows need {NVCC_HELP})")
    rows = report(archs, chosen)
    for arch in archs:
        print_table([r for r, _ in rows if r["target"] == arch], arch)
    if show:
        code = [c for r, c in rows if r["target"] == archs[0] and show in (r["kernel"],
                                                                           r["kernel"].split()[0])]
        if not code:
            raise ValueError(f"--show={show!r}: no such kernel; kernels: "
                             f"{', '.join(sorted({r['kernel'] for r, _ in rows}))}")
        print(code[0])


def _default_arch():
    """sm_XY of the GPU torch sees, when it is in LIMITS; else sm_89."""
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if f"sm_{major}{minor}" in LIMITS:
            return f"sm_{major}{minor}"
    return "sm_89"


if __name__ == "__main__":
    cli.run(main, globals())
