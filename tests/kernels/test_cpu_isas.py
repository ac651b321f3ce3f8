"""The CPU kernel's SIMD paths, each built and run without XLA (``cpu_kernel/selftest.cc``): AVX-512, AVX2 and
the portable loop where this x86-64 machine runs them, and aarch64 NEON cross-compiled and run under qemu-user
(skipped where ``aarch64-linux-gnu-g++`` or ``qemu-aarch64`` is missing: Debian's g++-aarch64-linux-gnu and
qemu-user). Every format x sym / asym x group x path (post-scaled M <= 2, row walk M <= 4, panel M >= 5, bfloat16
weights), and the block widths and micro-panel tails on a few schemes, against a float64 numpy product of the
dequantized weight. On an aarch64 host the NEON path is built and run natively."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from afpq_jax._src.kernels.quantized_matmul import cpu
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from tests.kernels.support import FORMATS, cpu_flags, dequantized64, make_weight

K, N = 300, 203  # a short last group, K not a multiple of 8; N: partial code chunks and a tail short of a vector
# Every format: post-scaled (M = 1, 2; AVX2 scales M = 1 only), row walk (3; 2 on AVX2), 4, panel (13 = 6 + 6 + 1).
MS = (1, 2, 3, 4, 13)
CASES = [(fmt, asym, group) for fmt in FORMATS + ("int8",) for asym in (True, False) for group in (32, 128, None)]
# bfloat16 weights take the row walk from M = 1 (BlockWide<1..4>) and the panel.
BF16_CASES = [("int4", True, 128), ("nf4", True, 64), ("fp4_e2m1", False, None), ("nf3", True, 32),
              ("int3", False, 128), ("fp3_e2m0", True, 32)]
# Block widths and micro-panel tails on a few schemes: on 2 threads, N = 176 / 216 / 1000 give strips of 1-4
# vectors on every ISA; M = 5, 8, 9, 10, 11 end in micro panels of 5, 2, 3, 4 and 5 rows.
SHAPE_CASES = [("int4", True, 128), ("nf4", True, 64), ("nf3", True, 32), ("fp4_e2m1", False, None)]
SHAPE_NS, SHAPE_MS = (176, 216, 1000), (1, 2, 5, 8, 9, 10, 11)


def _x86_paths() -> list[tuple[str, str]]:
    """(expected ISA, -march) of the paths this machine can run."""
    if os.uname().machine != "x86_64" or shutil.which("g++") is None:
        return []
    flags = cpu_flags()
    paths = [("portable", "x86-64-v2")]
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        paths.append(("avx2", "x86-64-v3"))
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        paths.append(("avx512", "x86-64-v4"))
    return paths


def _neon_path():
    if os.uname().machine == "aarch64":  # an ARM host: its own compiler, run natively
        return pytest.param("neon", "native", id="neon",
                            marks=pytest.mark.skipif(shutil.which("g++") is None, reason="no g++"))
    return pytest.param("neon", "armv8-a", id="neon-qemu",
                        marks=pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None
                                                 or shutil.which("qemu-aarch64") is None,
                                                 reason="no aarch64 cross compiler / qemu-aarch64 (Debian: "
                                                        "g++-aarch64-linux-gnu qemu-user)"))


PATHS = [pytest.param(isa, march, id=isa) for isa, march in _x86_paths()] + [_neon_path()]


@functools.cache
def _problems():
    """[(x float32 (m, K), dequantized float64 weight, serialized problem)], every case."""
    out = []
    rng = np.random.default_rng(7)
    for cases, dtype, ns, ms in ((CASES, jnp.float32, (N,), MS), (BF16_CASES, jnp.bfloat16, (N,), MS),
                                 (SHAPE_CASES, jnp.float32, SHAPE_NS, SHAPE_MS)):
        for (fmt, asym, group), n in [(c, n) for c in cases for n in ns]:
            qt = make_weight(fmt, group, asym, K, n)
            arrays, attrs = cpu.kernel_operands(qt, Problem.create((1, K), dtype, qt))
            w64 = dequantized64(qt, dtype)
            codes = np.asarray(arrays["codes"], np.uint8)
            scales = b"".join(np.asarray(arrays[a], np.float32).tobytes() for a in ("pos", "neg", "zero")
                              if arrays[a] is not None)
            for m in ms:
                x = rng.standard_normal((m, K), np.float32).astype(jnp.dtype(dtype)).astype(np.float32)
                header = np.asarray([m, K, n, codes.shape[0], attrs["bits"], attrs["group"], attrs["is_int"],
                                     attrs["has_neg"], attrs["has_zero"], dtype == jnp.bfloat16,
                                     attrs["table"].size], np.int64)
                out.append((x, w64, b"".join([header.tobytes(), attrs["table"].tobytes(), x.tobytes(),
                                              codes.tobytes(), scales])))
    return out


def _build(isa: str, march: str, out_dir) -> list[str]:
    """The command that runs the selftest of this path (built into out_dir)."""
    binary = str(out_dir / f"selftest-{isa}")
    source = str(cpu.SOURCES / "selftest.cc")
    if isa == "neon" and os.uname().machine != "aarch64":
        cmd = ["aarch64-linux-gnu-g++", *cpu.FLAGS, f"-march={march}", "-static", source, "-o", binary]
        run = ["qemu-aarch64", binary]
    else:
        cmd = ["g++", *cpu.FLAGS, f"-march={march}", source, "-o", binary]
        run = [binary]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.parametrize("isa,march", PATHS)
def test_every_format_on_every_path_equals_the_reference(isa, march, tmp_path):
    problems = _problems()
    (tmp_path / "in").write_bytes(b"".join(p for _, _, p in problems))
    run = _build(isa, march, tmp_path)
    r = subprocess.run([*run, str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = (tmp_path / "out").read_bytes()
    sizes = [x.shape[0] * w64.shape[1] * 4 for x, w64, _ in problems]
    assert data[sum(sizes):].decode().strip() == isa  # the path this build compiled is the one named
    at, worst = 0, 0.0
    for (x, w64, _), size in zip(problems, sizes):
        y = np.frombuffer(data[at:at + size], np.float32).reshape(x.shape[0], w64.shape[1])
        at += size
        x64 = x.astype(np.float64)
        bound = 1e-5 * (np.abs(x64) @ np.abs(w64)) + 1e-30  # float32 sums over K (see cpu_kernel/kernel.h)
        assert np.all(np.isfinite(y))
        worst = max(worst, float(np.max(np.abs(y - x64 @ w64) / bound)))
    assert worst <= 1.0, f"{isa}: max err / bound {worst:.3g}"


def test_a_bad_problem_is_refused_with_its_reason(tmp_path):
    """The shared checks (`Prepare`): a code-row count that does not match K and bits."""
    paths = _x86_paths()
    if not paths:
        pytest.skip("no x86-64 g++")
    bad = bytearray(_problems()[0][2])
    bad[24:32] = np.int64(1).tobytes()  # code_rows
    (tmp_path / "in").write_bytes(bytes(bad))
    isa, march = paths[0]
    run = _build(isa, march, tmp_path)
    r = subprocess.run([*run, str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "codes rows do not match K and bits" in r.stderr
