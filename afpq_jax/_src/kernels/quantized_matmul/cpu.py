"""The "cpu" implementation: a C++ kernel (``cpu_kernel/``) called through the XLA FFI.

XLA's CPU backend cannot fuse the decode of packed codes into its dot, so the "xla" path writes and reads back
the whole float weight (67 MB at 4096²), and "xla_scan" pays a dot call per chunk. This kernel reads the codes
once and accumulates in float32 per block of output columns (float32 or bfloat16 x), on XLA's intra-op thread
pool. One SIMD implementation (``cpu_kernel/simd_blocks.h``) over the vector ISA the compiler targets: AVX-512
(a code-book lookup is one register permute), AVX2 + FMA (two 8-entry permutes and a blend), aarch64 NEON (one
``vqtbl4q_u8``); elsewhere a portable loop. Numerics: see ``cpu_kernel/kernel.h`` (decode with float32 x, M <= 2
on AVX-512 / NEON, M = 1 on AVX2: per-group sums of x * level scaled once per group; otherwise weights equal to
`dequantize`'s, float32 sums in K order).

Built on first use from the packaged source with the system C++ compiler (``$CXX``, else ``g++``) into
``<asset cache>/kernels/``, under a name that hashes the sources, the compiler, the flags, jaxlib and the CPU's
features. It is compiled with ``-march=native`` (or ``$AFPQ_CPU_KERNEL_ARCH``: ``x86-64-v3`` builds the AVX2
path and ``x86-64-v2`` the portable one on an AVX-512 machine), written under a temporary name and renamed, so
concurrent processes never load a half-written library. The path built is logged once per process (INFO, logger
``afpq_jax.kernels``) and given by `isa`. No compiler, a failed build, an unwritable cache or
``AFPQ_CPU_KERNEL=0``: the implementation declines with the reason and dispatch moves on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.io.outputs import cache_dir, tmp_sibling
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from afpq_jax._src.qtensor import QuantizedTensor

SOURCES = Path(__file__).with_name("cpu_kernel")  # kernel.h (core), simd_blocks.h, isa_*.h, ffi.cc, selftest.cc
TARGET = "afpq_quantized_matmul_cpu"
FLAGS = ("-O3", "-std=c++17", "-fno-fast-math")
# Dispatch's size rule per path built and format kind: up to this many x rows the kernel is faster than "xla"
# (dequantize once, one BLAS dot); beyond, or where the limit is 0, dispatch runs "xla". Measured at K = N = 4096
# g128 (`python -m benchmarks.cpu_kernel --xla`; BUILD_NOTES, "CPU path per ISA"): AVX-512 and AVX2 0.96-0.98x
# of "xla" at M = 256; the portable loop INT4 0.95x at M = 16, 1.39x at 32, and its code-book lookup 1.85x slower
# than "xla" already at M = 1. NEON could not be timed (no ARM machine here): it takes AVX2's rule.
MAX_M = {"avx512": {"int": 256, "codebook": 256}, "avx2": {"int": 256, "codebook": 256},
         "neon": {"int": 256, "codebook": 256}, "portable": {"int": 16, "codebook": 0}}
logger = logging.getLogger("afpq_jax.kernels")


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


@functools.cache
def build() -> Path | str:
    """The compiled library's path, or why it is unavailable (one line)."""
    if os.environ.get("AFPQ_CPU_KERNEL", "1") == "0":
        return "disabled by AFPQ_CPU_KERNEL=0"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) to build the CPU kernel; install g++ or set CXX"
    import jaxlib
    # AFPQ_CPU_KERNEL_ARCH: e.g. x86-64-v3 / x86-64-v2 build the AVX2 / portable path on an AVX-512 machine.
    flags = (*FLAGS, "-shared", "-fPIC", f"-march={os.environ.get('AFPQ_CPU_KERNEL_ARCH', 'native')}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    sources = "\0".join(f"{f.name}\0{f.read_text()}" for f in sorted(SOURCES.iterdir()) if f.suffix in (".h", ".cc"))
    key = hashlib.sha256("\0".join([sources, cxx, version, " ".join(flags), jaxlib.__version__,
                                    _cpu_features()]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"afpq_cpu_{key}.so"
    if out.exists():
        return out
    tmp = tmp_sibling(out)
    cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(SOURCES / "ffi.cc"), "-o", str(tmp)]
    start = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
            return f"building the CPU kernel failed ({' '.join(cmd[:2])} ...): {first}"
        os.replace(tmp, out)
        logger.info("built the CPU kernel in %.1f s: %s", time.perf_counter() - start, out)
    except OSError as e:  # an unwritable cache, a compiler that cannot run
        return f"cannot build the CPU kernel in {out.parent}: {e}"
    finally:
        if tmp.exists():  # not unlink(missing_ok=True): that raises when the cache's parent is a file
            tmp.unlink()
    return out


@functools.cache
def _loaded() -> tuple[str | None, str | None]:
    """Loads and registers the kernel once per process: (the ISA of its SIMD path, None) or (None, why not)."""
    lib = build()
    if isinstance(lib, str):
        return None, lib
    try:
        dll = ctypes.cdll.LoadLibrary(str(lib))
        handler = dll.AfpqQuantizedMatmulCpu
        isa_name = dll.AfpqCpuKernelIsa
    except (OSError, AttributeError) as e:
        return None, f"cannot load the CPU kernel {lib}: {e}"
    isa_name.restype = ctypes.c_char_p
    name = isa_name().decode()
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    logger.info("quantized_matmul: the CPU kernel runs its %s path (%s)", name, lib.name)
    return name, None


def isa() -> str | None:
    """The vector ISA of the CPU kernel this process runs ("avx512", "avx2", "neon", "portable"), or None when
    it cannot be built."""
    return _loaded()[0]


def why_not_preferred(prob: Problem) -> str | None:
    """Dispatch's size rule for the path built (explicit calls run any M). A call the kernel cannot take, or no
    kernel: no rule, so that `supports` declines with the reason (logged) instead of dispatch skipping it
    silently; and nothing is compiled for a call it could never run."""
    if _why_not_shape(prob) is not None:
        return None
    path = isa()
    if path is None:
        return None
    kind = "int" if prob.fmt.is_int else "codebook"
    limit = MAX_M[path][kind]
    if prob.m <= limit:
        return None
    if limit == 0:
        return f"the {path} path's code-book lookup is slower than dequantizing once and one dot"
    return f"M={prob.m} > {limit} on the {path} path: dequantizing once and one dot is faster"


def why_unsupported(prob: Problem) -> str | None:
    """Why the kernel cannot run this call (the shape, or no kernel built), or None."""
    return _why_not_shape(prob) or _loaded()[1]


def _why_not_shape(prob: Problem) -> str | None:
    """Why the kernel cannot take this call whatever is built (cheap: no compile)."""
    if prob.batched:
        return "stacked (batched) weights: use xla"
    if prob.x_dtype not in ("float32", "bfloat16"):
        return f"x is {prob.x_dtype}; the CPU kernel takes float32 or bfloat16 x"
    if len(prob.fmt.levels) > 16 and not prob.fmt.is_int:
        return "code books above 16 levels"
    return None


def kernel_operands(qt: QuantizedTensor, prob: Problem) -> tuple[dict, dict]:
    """The kernel's array operands (codes, float32 pos / neg / zero: None where unused) and attributes for ``qt``,
    in the order and form the FFI handler (and ``cpu_kernel/selftest.cc``) take them."""
    fmt = prob.fmt
    pos, neg = qt.float_scales()
    arrays = {"codes": qt.codes, "pos": pos.astype(jnp.float32),
              "neg": None if neg is None else neg.astype(jnp.float32),
              "zero": None if qt.zero is None else qt.zero.astype(jnp.float32)}
    attrs = {"bits": np.int64(prob.bits), "group": np.int64(prob.group), "is_int": bool(fmt.is_int),
             "has_neg": neg is not None, "has_zero": qt.zero is not None,
             "table": np.asarray([0.0] if fmt.is_int else fmt.levels_array(), np.float32)}
    return arrays, attrs


def quantized_matmul_cpu(x2d: jax.Array, qt: QuantizedTensor, prob: Problem) -> jax.Array:
    """(M, K) @ W -> (M, N) in x's dtype (float32 or bfloat16: x goes in as float32, exactly, and the kernel
    rounds each weight to bfloat16)."""
    arrays, attrs = kernel_operands(qt, prob)
    unused = jnp.zeros((1, 1), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((prob.m, prob.n), jnp.float32),
                            vmap_method="sequential")
    y = call(x2d.astype(jnp.float32), arrays["codes"], arrays["pos"],
             unused if arrays["neg"] is None else arrays["neg"], unused if arrays["zero"] is None else arrays["zero"],
             round_bf16=prob.x_dtype == "bfloat16", **attrs)
    return y.astype(x2d.dtype)
