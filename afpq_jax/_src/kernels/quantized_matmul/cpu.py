"""The "cpu" implementation: a C++ kernel (``cpu_kernel.cc``) called through the XLA FFI.

XLA's CPU backend cannot fuse the decode of packed codes into its dot, so the "xla" path writes and reads back
the whole float weight (67 MB at 4096²), and "xla_scan" pays a dot call per chunk. This kernel reads the codes
once and accumulates in float32 per block of output columns (float32 or bfloat16 x), on XLA's intra-op thread pool; with AVX-512 a
codebook lookup is one register permute. Numerics: see the C++ file (decode, M <= 2 with float32 x: per-group
sums of x * level scaled once per group; otherwise weights bit-identical to `dequantize`, float32 sums in K
order).

Built on first use from the packaged source with the system C++ compiler (``$CXX``, else ``g++``) into
``<asset cache>/kernels/``, under a name that hashes the source, the compiler, the flags, jaxlib and the CPU's
features. It is compiled with ``-march=native`` (or ``$AFPQ_CPU_KERNEL_ARCH``), written under a temporary name
and renamed, so concurrent processes never load a half-written library. No compiler, a failed build, an
unwritable cache or ``AFPQ_CPU_KERNEL=0``: the implementation declines with the reason and dispatch moves on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.io.outputs import cache_dir, tmp_sibling
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from afpq_jax._src.qtensor import QuantizedTensor

SOURCE = Path(__file__).with_name("cpu_kernel.cc")
TARGET = "afpq_quantized_matmul_cpu"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-fast-math")
MAX_M = 256  # dispatch: beyond this many x rows, dequantizing once and one BLAS dot ("xla") is faster


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
    # AFPQ_CPU_KERNEL_ARCH: e.g. x86-64-v2 builds the portable path on an AVX-512 machine (its test does).
    flags = (*FLAGS, f"-march={os.environ.get('AFPQ_CPU_KERNEL_ARCH', 'native')}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(flags), jaxlib.__version__,
                                    _cpu_features()]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"afpq_cpu_{key}.so"
    if out.exists():
        return out
    tmp = tmp_sibling(out)
    cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
            return f"building the CPU kernel failed ({' '.join(cmd[:2])} ...): {first}"
        os.replace(tmp, out)
    except OSError as e:  # an unwritable cache, a compiler that cannot run
        return f"cannot build the CPU kernel in {out.parent}: {e}"
    finally:
        if tmp.exists():  # not unlink(missing_ok=True): that raises when the cache's parent is a file
            tmp.unlink()
    return out


@functools.cache
def _registered() -> str | None:
    """Loads and registers the kernel once per process; None, or why not."""
    lib = build()
    if isinstance(lib, str):
        return lib
    try:
        handler = ctypes.cdll.LoadLibrary(str(lib)).AfpqQuantizedMatmulCpu
    except (OSError, AttributeError) as e:
        return f"cannot load the CPU kernel {lib}: {e}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def why_not_preferred(prob: Problem) -> str | None:
    """Dispatch's size rule (explicit calls run any M)."""
    return f"M={prob.m} > {MAX_M}: dequantizing once and one dot is faster" if prob.m > MAX_M else None


def why_unsupported(prob: Problem) -> str | None:
    if prob.batched:
        return "stacked (batched) weights: use xla"
    if prob.x_dtype not in ("float32", "bfloat16"):
        return f"x is {prob.x_dtype}; the CPU kernel takes float32 or bfloat16 x"
    if len(prob.fmt.levels) > 16 and not prob.fmt.is_int:
        return "code books above 16 levels"
    return _registered()


def quantized_matmul_cpu(x2d: jax.Array, qt: QuantizedTensor, prob: Problem) -> jax.Array:
    """(M, K) @ W -> (M, N) in x's dtype (float32 or bfloat16: x goes in as float32, exactly, and the kernel
    rounds each weight to bfloat16)."""
    fmt = prob.fmt
    pos, neg = qt.float_scales()
    unused = jnp.zeros((1, 1), jnp.float32)
    zero = unused if qt.zero is None else qt.zero.astype(jnp.float32)
    levels = np.asarray([0.0] if fmt.is_int else fmt.levels_array(), np.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((prob.m, prob.n), jnp.float32),
                            vmap_method="sequential")
    y = call(x2d.astype(jnp.float32), qt.codes, pos.astype(jnp.float32),
             unused if neg is None else neg.astype(jnp.float32), zero,
             bits=np.int64(prob.bits), group=np.int64(prob.group), is_int=bool(fmt.is_int),
             has_neg=neg is not None, has_zero=qt.zero is not None, round_bf16=prob.x_dtype == "bfloat16",
             table=levels)
    return y.astype(x2d.dtype)
