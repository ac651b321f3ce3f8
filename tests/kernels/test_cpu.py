"""The CPU paths of `quantized_matmul`: the C++ kernel ("cpu") and the scan ("xla_scan")."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afpq_jax._src import quantizer
from afpq_jax._src.kernels.quantized_matmul import cpu
from afpq_jax.kernels import BlockConfig, quantized_matmul, why_not
from tests.kernels.support import FORMATS, check_against_reference, cpu_flags, make_weight, make_x


# ---------------------------------------------------------------------------------------------------------
# The CPU paths: the C++ kernel ("cpu") and the scan ("xla_scan").

@pytest.mark.parametrize("fmt", FORMATS + ("int8",))
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("group", [32, 128, None])
def test_cpu_kernel_equals_the_reference(fmt, asym, group):
    # N = 1100 on one thread: blocks of 352, 352 and 384 columns (the AVX-512 path where the machine has it;
    # 352 ends in a 32-column chunk) and a 12-column tail (the portable path); K = 1003: a short last group, a K
    # that is not a multiple of 8 and a short last K chunk.
    # M = 1, 2: the post-scaled path (per-group sums; strips of 64 and 32 columns here, 48 and 16 in the tests
    # below); M = 4: the row-walking path; M = 13: the panel path (micro-kernels of 6 + 6 + 1 rows).
    qt = make_weight(fmt, group, asym, 1003, 1100)
    for m in (1, 2, 4, 13):
        x = make_x((m, 1003), jnp.float32)
        check_against_reference(quantized_matmul(x, qt, implementation="cpu"), x, qt)


def test_cpu_kernel_shapes_and_transforms():
    qt = make_weight("nf3", 64, True, 200, 600)
    for shape in [(1, 200), (2, 3, 200), (300, 200)]:  # leading axes flatten; M past the size rule
        x = make_x(shape, jnp.float32)
        check_against_reference(jax.jit(lambda a, q: quantized_matmul(a, q, implementation="cpu"))(x, qt), x, qt)
    xs = make_x((3, 2, 200), jnp.float32)
    y = jax.vmap(lambda a: quantized_matmul(a, qt, implementation="cpu"))(xs)
    check_against_reference(y.reshape(6, -1), xs.reshape(6, 200), qt)
    assert "float32 or bfloat16 x" in why_not("cpu", make_x((1, 200), jnp.float16), qt)


@pytest.mark.parametrize("fmt,group,asym", [("int4", 128, True), ("nf4", 64, True), ("fp4_e2m1", None, False),
                                            ("nf3", 32, True), ("int3", 128, False)])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_cpu_kernel_bfloat16_x(fmt, group, asym, m):
    """bfloat16 x: weights rounded to bfloat16 in the kernel, float32 sums, a bfloat16 result (the contract)."""
    qt = make_weight(fmt, group, asym, 1003, 1100)
    x = make_x((m, 1003), jnp.bfloat16)
    y = quantized_matmul(x, qt, implementation="cpu")
    check_against_reference(y, x, qt)
    # exactly the float32 sum of bf16 x times bf16-rounded weights, up to order: compare to a float64 reference
    w16 = np.asarray(quantizer.dequantize(qt, jnp.bfloat16), np.float64)
    ref = np.asarray(x, np.float64) @ w16
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= 2.0**-8 * np.abs(ref) + 1e-5 * (np.abs(np.asarray(x, np.float64)) @ np.abs(w16)) + 1e-30)


_CPU_SUBPROCESS = """
import sys, jax, jax.numpy as jnp, numpy as np
import afpq_jax
from afpq_jax.kernels import quantized_matmul, select_implementation, Problem
# N = 2048: four 512-column tasks; N = 200: two of 96 and the last 8 columns (portable); N = 1100: four of 272
# (partial 64-column chunks); 7 rows: the panel path (micro-kernels of 6 + 1 rows), 1 row: the post-scaled one.
worst, chosen = 0.0, set()
for (k, n, fmt) in [(512, 2048, "int4"), (300, 200, "nf3"), (256, 1100, "fp4_e2m1")]:
    qt = afpq_jax.quantize(jax.random.normal(jax.random.key(0), (k, n)), fmt, group_size=128)
    w = np.asarray(afpq_jax.dequantize(qt, jnp.float32), np.float64)
    for m in (1, 7):
        x = jax.random.normal(jax.random.key(1), (m, k))
        chosen.add(select_implementation(Problem.create(x.shape, x.dtype, qt), backend="cpu")[0])
        y = np.asarray(quantized_matmul(x, qt))
        x64 = np.asarray(x, np.float64)
        worst = max(worst, float((np.abs(y - x64 @ w) / (1e-5 * (np.abs(x64) @ np.abs(w)) + 1e-30)).max()))
print(",".join(sorted(chosen)), worst)
"""


def test_cpu_kernel_threads_and_unbuildable_fallback(tmp_path):
    """XLA's default thread pool (the suite runs single-threaded): column tasks split evenly over the threads,
    within the suite's bound (1e-5 * |x| @ |w|). No compiler: the kernel declines with the reason and dispatch
    runs "xla"."""
    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    threaded = subprocess.run([sys.executable, "-c", _CPU_SUBPROCESS], env=base_env, capture_output=True,
                              text=True, timeout=300)
    assert threaded.returncode == 0, threaded.stderr[-2000:]
    chosen, err = threaded.stdout.split()
    assert chosen == "cpu" and float(err) <= 1.0
    env = {**base_env, "CXX": str(tmp_path / "no-such-compiler"), "AFPQ_CACHE": str(tmp_path / "cache")}
    fallback = subprocess.run([sys.executable, "-c", _CPU_SUBPROCESS], env=env, capture_output=True, text=True,
                              timeout=300)
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    chosen, err = fallback.stdout.split()
    assert chosen == "xla" and float(err) <= 1.0
    assert "no C++ compiler" in fallback.stderr and "using xla" in fallback.stderr
    assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").iterdir())
    (tmp_path / "a-file").write_text("")  # a cache that cannot hold the library
    env = {**base_env, "AFPQ_CACHE": str(tmp_path / "a-file")}
    unwritable = subprocess.run([sys.executable, "-c", _CPU_SUBPROCESS], env=env, capture_output=True, text=True,
                                timeout=300)
    assert unwritable.returncode == 0, unwritable.stderr[-2000:]
    assert unwritable.stdout.split()[0] == "xla" and "cannot build the CPU kernel" in unwritable.stderr


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march levels")
def test_the_path_built_follows_the_cpu_and_the_arch_override(tmp_path):
    """-march=native builds the widest path this CPU runs, and logs which; AFPQ_CPU_KERNEL_ARCH=x86-64-v2 builds
    the portable loop (the numerics of each path: tests/kernels/test_cpu_isas.py), still called through XLA."""
    flags = cpu_flags()
    widest = "avx512" if {"avx512f", "avx512bw"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
    if "AFPQ_CPU_KERNEL_ARCH" not in os.environ:
        assert cpu.isa() == widest
    code = """
import logging, jax, jax.numpy as jnp, numpy as np, afpq_jax
from afpq_jax.kernels import cpu_kernel_isa, quantized_matmul
logging.basicConfig(level=logging.INFO)
qt = afpq_jax.quantize(jax.random.normal(jax.random.key(0), (300, 130)), "nf4", group_size=64)
x = jax.random.normal(jax.random.key(1), (3, 300))
y = np.asarray(quantized_matmul(x, qt, implementation="cpu"), np.float64)
w = np.asarray(afpq_jax.dequantize(qt, jnp.float32), np.float64)
x64 = np.asarray(x, np.float64)
print(cpu_kernel_isa(), float((np.abs(y - x64 @ w) / (1e-5 * (np.abs(x64) @ np.abs(w)) + 1e-30)).max()))
"""
    env = {**os.environ, "AFPQ_CPU_KERNEL_ARCH": "x86-64-v2", "AFPQ_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    isa, err = r.stdout.split()[-2:]
    assert isa == "portable" and float(err) <= 1.0
    assert "the CPU kernel runs its portable path" in r.stderr and "built the CPU kernel in" in r.stderr
    assert len(list((tmp_path / "kernels").glob("afpq_cpu_*.so"))) == 1


@pytest.mark.parametrize("fmt,group,asym,k,n,dtype", [("int4", 128, True, 576, 160, jnp.float32),
                                                     ("nf3", 32, True, 100, 40, jnp.bfloat16),
                                                     ("int3", 128, False, 300, 72, jnp.float32),
                                                     ("fp4_e2m1", None, False, 200, 64, jnp.float32),
                                                     ("nf4", 64, True, 256, 96, jnp.float32)])
def test_xla_scan_equals_the_reference(fmt, group, asym, k, n, dtype):
    qt = make_weight(fmt, group, asym, k, n)
    x = make_x((3, k), dtype)
    # several groups per chunk (g <= 64), or a chunk inside a group (g = 128 with 64-row chunks)
    config = BlockConfig(block_k=64) if group is not None and (group <= 64 or fmt == "int3") else None
    y = quantized_matmul(x, qt, implementation="xla_scan", config=config)
    ref = quantized_matmul(x, qt, implementation="xla")
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # the same dequantized values; only the order of the float32 sum differs (per-chunk partial dots)
    check_against_reference(y, x, qt, ref)
