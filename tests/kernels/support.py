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


@jax.jit
def _xla_reference(x, qt):  # one program per case (op by op, the reference compiled each of its ops)
    return quantized_matmul(x, qt, implementation="xla")


def check_against_reference(y, x, qt, ref=None):
    x32 = np.asarray(x, np.float32).reshape(-1, qt.in_features)
    w32 = np.asarray(quantizer.dequantize(qt, x.dtype), np.float32)
    ref = _xla_reference(x, qt) if ref is None else ref
    assert y.shape == ref.shape and y.dtype == ref.dtype == x.dtype
    y32 = np.asarray(y, np.float32).reshape(-1, qt.out_features)
    r32 = np.asarray(ref, np.float32).reshape(-1, qt.out_features)
    eps_out = 0.0 if x.dtype == jnp.float32 else float(jnp.finfo(x.dtype).eps)
    bound = eps_out * np.abs(r32) + 1e-5 * (np.abs(x32) @ np.abs(w32)) + 1e-30
    err = np.abs(y32 - r32)
    assert np.all(np.isfinite(y32))
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


def run_impl(impl, x, qt, config=None):
    return jax.jit(lambda x, q: quantized_matmul(x, q, implementation=impl, config=config, interpret=INTERPRET))(x, qt)


TPU_KINDS = ("TPU v4", "TPU v5 lite", "TPU v6 lite")


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
