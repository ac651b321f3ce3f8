"""Helpers shared by the kernel tests: cached weights, tolerance check, abstract shapes."""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax
from afpq_jax._src import quantizer
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from afpq_jax.kernels import quantized_matmul

NATIVE = os.environ.get("AFPQ_KERNELS_NATIVE") == "1"
INTERPRET = not NATIVE
FORMATS = ("int2", "int3", "int4", "fp3_e2m0", "fp4_e2m1", "nf3", "nf4")
KERNELS = ("mosaic_tpu", "triton", "mosaic_gpu")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (/proc/cpuinfo; empty where it has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@functools.lru_cache(maxsize=None)
def make_weight(fmt: str, group: int | None, asym: bool, k: int, n: int, seed: int = 0, integer_scales: bool = False):
    w = np.random.default_rng(seed).standard_normal((k, n), np.float32)  # numpy: no program to compile per shape
    # A few exact zeros and one-signed columns exercise the zero codes and zero-scale sides.
    w[:, 0] = np.abs(w[:, 0])
    w[3, :] = 0.0
    return afpq_jax.quantize(w, fmt, group_size=group, asym=asym, integer_scales=integer_scales)


@functools.lru_cache(maxsize=None)
def abstract_weight(fmt: str, group: int | None, asym: bool, k: int, n: int, integer_scales: bool = False):
    """Shape-only QuantizedTensor (ShapeDtypeStruct leaves) for lowering / planning tests: no quantization run."""
    return jax.eval_shape(lambda w: afpq_jax.quantize(w, fmt, group_size=group, asym=asym,
                                                      integer_scales=integer_scales),
                          jax.ShapeDtypeStruct((k, n), jnp.float32))


def make_x(shape, dtype, seed=1):
    # cast on the host (ml_dtypes rounds to nearest even like XLA): no device program per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(jnp.dtype(dtype)))


_DEQUANTIZED: dict[tuple[int, str], tuple[object, np.ndarray]] = {}


def dequantized64(qt, dtype) -> np.ndarray:
    """``dequantize(qt, dtype)`` as float64, computed once per weight and dtype (the numerics tests check several
    x shapes against one weight). Keyed by identity: `make_weight` returns the same object for the same case."""
    key = (id(qt), jnp.dtype(dtype).name)
    hit = _DEQUANTIZED.get(key)
    if hit is None or hit[0] is not qt:
        if len(_DEQUANTIZED) >= 8:
            _DEQUANTIZED.pop(next(iter(_DEQUANTIZED)))
        hit = _DEQUANTIZED[key] = (qt, np.asarray(quantizer.dequantize(qt, dtype), np.float64))
    return hit[1]


def check_against_reference(y, x, qt, ref=None):
    """``y`` against ``x @ dequantize(qt)``: by default the float64 product of the values the kernel multiplies
    (x, and the weight rounded to x's dtype), or ``ref`` (another implementation's output). Bound: the output's
    rounding (x's dtype) plus 1e-5 * |x| @ |w| for the float32 sums over K."""
    x32 = np.asarray(x, np.float32).reshape(-1, qt.in_features)
    w64 = dequantized64(qt, x.dtype)
    assert y.shape == (*x.shape[:-1], qt.out_features) and y.dtype == x.dtype
    if ref is None:
        r32 = x32.astype(np.float64) @ w64
    else:
        assert ref.shape == y.shape and ref.dtype == y.dtype
        r32 = np.asarray(ref, np.float32).reshape(-1, qt.out_features)
    y32 = np.asarray(y, np.float32).reshape(-1, qt.out_features)
    eps_out = 0.0 if x.dtype == jnp.float32 else float(jnp.finfo(x.dtype).eps)
    bound = eps_out * np.abs(r32) + 1e-5 * (np.abs(x32) @ np.abs(w64)) + 1e-30
    err = np.abs(y32 - r32)
    assert np.all(np.isfinite(y32))
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


def run_impl(impl, x, qt, config=None):
    return jax.jit(lambda x, q: quantized_matmul(x, q, implementation=impl, config=config, interpret=INTERPRET))(x, qt)


TPU_KINDS = ("TPU v4", "TPU v5 lite", "TPU v6 lite")


def on_tpu(kind: str):
    """Context in which jit lowering and `pltpu.get_tpu_info` target one TPU of ``kind`` (an abstract mesh)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
    device = AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
    return use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device))


def input_fusion_flags(text: str) -> list[str]:
    """The ``allow_input_fusion`` list of the one TPU custom call in lowered StableHLO text."""
    (flags,) = re.findall(r"allow_input_fusion\\22: \[([a-z,]+)\]", text)
    return flags.split(",")


def custom_call_operands(text: str) -> int:
    (operands,) = re.findall(r"@tpu_custom_call\(([^)]*)\)", text)
    return len(operands.split(","))


def eqns_around_kernels(jaxpr) -> list:
    """The equations of a traced op, looking through the derivative wrapper (`with_reference_derivatives`'s
    custom_jvp_call) but not into kernels or loop bodies."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call":
            out += eqns_around_kernels(eqn.params["call_jaxpr"].jaxpr)
        else:
            out.append(eqn)
    return out


def make_problem(fmt="int4", group=128, asym=True, m=4, k=1024, n=256, dtype=jnp.bfloat16):
    return Problem.create((m, k), dtype, abstract_weight(fmt, group, asym, k, n))
