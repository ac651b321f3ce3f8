"""`afpq_jax.kernels.quantized_matmul` (`pallas_kernels.quantized_matmul` re-exports it): every Pallas implementation (interpret mode) against the "xla" reference,
lowering of each kernel for its real backend (from CPU), dispatch and fallback, config and roofline helpers.

``AFPQ_KERNELS_NATIVE=1`` (set by `benchmarks/device_check.sh` on a GPU/TPU machine, with ``JAX_PLATFORMS`` left to
JAX): the numerics tests compile the kernels of the machine's backend for real (``interpret=False``) and every
other test is skipped.

Tolerance: implementations differ only in the order of the float32 accumulation (the dequantized weights are
bit-identical), so |y - ref| <= eps_out(dtype) * |ref| + 1e-5 * (|x| @ |W|): 1e-5 relative to the magnitude of
the products for float32 output, plus one rounding of the result for bfloat16 / float16 output.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import afpq_jax
from afpq_jax._src import quantizer
from afpq_jax.kernels import (IMPLEMENTATIONS, BlockConfig, current_backend, quantized_matmul, select_implementation,
                              why_not)
from afpq_jax._src.kernels.quantized_matmul import api, base, roofline
from afpq_jax._src.kernels.quantized_matmul.base import Problem

NATIVE = os.environ.get("AFPQ_KERNELS_NATIVE") == "1"
INTERPRET = not NATIVE
FORMATS = ("int2", "int3", "int4", "fp3_e2m0", "fp4_e2m1", "nf3", "nf4")
KERNELS = ("mosaic_tpu", "triton", "mosaic_gpu")


@functools.lru_cache(maxsize=None)
def _weight(fmt: str, group: int | None, asym: bool, k: int, n: int, seed: int = 0, integer_scales: bool = False):
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32)
    # A few exact zeros and one-signed columns exercise the zero codes and zero-scale sides.
    w = w.at[:, 0].set(jnp.abs(w[:, 0])).at[3, :].set(0.0)
    return afpq_jax.quantize(w, fmt, group_size=group, asym=asym, integer_scales=integer_scales)


@pytest.fixture(autouse=True)
def _native_kernels_only(request):
    """Native mode: only tests that run one of this backend's kernels (an ``impl`` parameter)."""
    if NATIVE:
        spec = getattr(request.node, "callspec", None)
        impl = spec.params.get("impl") if spec else None
        if impl not in IMPLEMENTATIONS or impl.startswith("xla") or IMPLEMENTATIONS[impl].backend != current_backend():
            pytest.skip(f"native kernel run on {current_backend()}: not one of its kernels' numerics")


@functools.lru_cache(maxsize=None)
def _abstract_weight(fmt: str, group: int | None, asym: bool, k: int, n: int, integer_scales: bool = False):
    """Shape-only QuantizedTensor (ShapeDtypeStruct leaves) for lowering / planning tests: no quantization run."""
    return jax.eval_shape(lambda w: afpq_jax.quantize(w, fmt, group_size=group, asym=asym,
                                                      integer_scales=integer_scales),
                          jax.ShapeDtypeStruct((k, n), jnp.float32))


def _x(shape, dtype, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _check(y, x, qt, ref=None):
    x32 = np.asarray(x, np.float32).reshape(-1, qt.in_features)
    w32 = np.asarray(quantizer.dequantize(qt, x.dtype), np.float32)
    ref = quantized_matmul(x, qt, implementation="xla") if ref is None else ref
    assert y.shape == ref.shape and y.dtype == ref.dtype == x.dtype
    y32 = np.asarray(y, np.float32).reshape(-1, qt.out_features)
    r32 = np.asarray(ref, np.float32).reshape(-1, qt.out_features)
    eps_out = 0.0 if x.dtype == jnp.float32 else float(jnp.finfo(x.dtype).eps)
    bound = eps_out * np.abs(r32) + 1e-5 * (np.abs(x32) @ np.abs(w32)) + 1e-30
    err = np.abs(y32 - r32)
    assert np.all(np.isfinite(y32))
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


def _run(impl, x, qt, config=None):
    return jax.jit(lambda x, q: quantized_matmul(x, q, implementation=impl, config=config, interpret=INTERPRET))(x, qt)


# ---------------------------------------------------------------------------------------------------------
# Numerics: formats x scheme x group size (every kernel), one shape crossing N and K tails.
#
# Native runs (the device check) compile every format x scheme x group: a real compile can fault on one
# combination only (the H200's Mosaic GPU INT3-asym did). In interpret mode on CPU a covering set runs instead:
# every (format, scheme) and every (format, group) pair at least once, half the compiles of the product.
# AFPQ_KERNEL_TESTS_FULL=1 runs the whole product in interpret mode too.
FULL_PRODUCT = NATIVE or os.environ.get("AFPQ_KERNEL_TESTS_FULL") == "1"


def _format_cases(impl, full=FULL_PRODUCT):
    cases = []
    for i, fmt in enumerate(FORMATS):
        bits = afpq_jax.formats.get_format(fmt).bits
        if impl == "mosaic_gpu":
            # WGMMA-layout scope: groups >= 64 * rows-per-byte (see mosaic_gpu.why_unsupported); one group per
            # scheme already.
            big = 512 if bits == 3 else 256
            combos = [(True, big), (False, None)]
            if fmt == "int3":
                combos = combos[1:]  # asym declined (misaligned access on an H200); in test_documented_declines
        else:
            groups = [g for g in (32, 128, None) if not (impl == "mosaic_tpu" and g == 32 and bits == 3)]
            # (3-bit g32 is declined on TPU: 4-row scale slabs; covered by test_documented_declines)
            if full:
                combos = [(a, g) for a in (True, False) for g in groups]
            else:  # the scheme alternates along a format's groups, and (by the i // 2 shift) along the formats
                # that share a group even when TPU skips g32 for every 3-bit (odd-index) format
                combos = [((i + i // 2 + (32, 128, None).index(g)) % 2 == 0, g) for g in groups]
            if fmt in ("nf4", "nf3"):  # the paper's formats, asym: also the group sizes between
                combos += [(True, 64), (True, 256)]
        for asym, g in combos:
            cases.append(pytest.param(impl, fmt, g, asym, id=f"{impl}-{fmt}-{'a' if asym else 's'}-g{g}"))
    return cases


def test_format_cases_cover_every_scheme_and_group_per_format():
    for impl in ("mosaic_tpu", "triton"):
        full = {tuple(c.values[1:]) for c in _format_cases(impl, full=True)}
        cover = {tuple(c.values[1:]) for c in _format_cases(impl, full=False)}
        assert cover <= full and len(cover) < len(full)
        for f in FORMATS:
            in_full = [(g, a) for ff, g, a in full if ff == f]
            in_cover = [(g, a) for ff, g, a in cover if ff == f]
            assert {a for _, a in in_cover} == {a for _, a in in_full}, (impl, f)
            assert {g for g, _ in in_cover} == {g for g, _ in in_full}, (impl, f)
        for g in (32, 128, None):
            assert {a for _, gg, a in cover if gg == g} == {True, False}, (impl, g)


@pytest.mark.parametrize("impl,fmt,group,asym", [c for k in KERNELS for c in _format_cases(k)])
def test_formats_match_reference(impl, fmt, group, asym):
    if impl == "mosaic_gpu":
        m, k, n, dt = 3, 1024, 128, jnp.bfloat16
    else:
        m, k, n, dt = 3, 576, 200, jnp.float32  # SmolLM2's K (4.5 groups of 128), N not a multiple of 128
    qt = _weight(fmt, group, asym, k, n)
    x = _x((m, k), dt)
    _check(_run(impl, x, qt), x, qt)


# ---------------------------------------------------------------------------------------------------------
# Numerics: shapes (decode M=1/16, ragged M, K and N at and across block boundaries, leading axes, dtypes).

TPU_SMALL = BlockConfig(block_n=128)
SHAPES = {
    # impl: [(fmt, group, asym, x_shape, N, dtype, config)]
    "mosaic_tpu": [
        ("nf4", 128, True, (1, 4096), 256, jnp.bfloat16, None),         # decode, 2 K steps, x resident
        ("int4", 128, False, (16, 4096), 384, jnp.bfloat16, TPU_SMALL),  # 3 N tiles, 2 K steps
        ("fp4_e2m1", 32, True, (17, 1100), 256, jnp.float32, TPU_SMALL),  # K tail inside a step, 35 groups
        ("nf3", 64, True, (5, 2112), 130, jnp.float32, None),           # 3-bit, one whole-K step, N tail
        ("nf3", 128, False, (2, 4096), 128, jnp.float16, None),         # 3-bit, 2 K steps (plane blocks)
        ("int4", 32, True, (2, 3, 2048), 256, jnp.float16, TPU_SMALL),  # leading axes, zero points, 2 steps
        ("int2", None, True, (260, 512), 128, jnp.bfloat16, BlockConfig(block_m=128, x_resident=False)),
        ("nf4", 32, False, (16, 1024), 128, jnp.bfloat16, BlockConfig(block_k=512, x_resident=False)),
        # Levels by lane gather from a one-row table (opt-in): 2 K steps, 3 N tiles, 3-bit, FP3 per-channel.
        ("nf4", 128, True, (1, 4096), 384, jnp.bfloat16, BlockConfig(lookup=True, block_n=128)),
        ("nf3", 64, True, (5, 2112), 256, jnp.float32, BlockConfig(lookup=True)),
        ("fp4_e2m1", 32, True, (17, 1100), 256, jnp.float32, BlockConfig(lookup=True, block_n=128)),
        ("fp3_e2m0", None, False, (3, 1024), 128, jnp.float16, BlockConfig(lookup=True)),
    ],
    "triton": [
        ("int4", 128, True, (1, 1024), 256, jnp.bfloat16, None),
        ("nf4", 128, True, (16, 1040), 300, jnp.float16, None),         # K and N tails
        ("fp4_e2m1", 32, False, (17, 576), 64, jnp.float32, BlockConfig(block_k=64, split_k=4)),  # 9 K steps,
        # split-K: 3 programs per tile with 3 steps each
        ("nf3", 64, True, (130, 576), 96, jnp.bfloat16, None),          # 2 M tiles, 3-bit split rows
        ("int3", 256, True, (4, 1024), 128, jnp.float32, BlockConfig(block_k=128)),  # group > block_k
        ("int2", None, False, (2, 3, 512), 128, jnp.bfloat16, None),    # leading axes
        # Codebook levels by select tree / FP4 arithmetic instead of the table load (K tail, unmasked K, 3-bit).
        ("nf4", 128, True, (16, 1040), 300, jnp.float16, BlockConfig(lookup=False)),
        ("fp4_e2m1", 32, True, (3, 576), 200, jnp.float32, BlockConfig(lookup=False, block_k=64)),
        ("nf3", 64, True, (5, 576), 96, jnp.bfloat16, BlockConfig(lookup=False)),
    ],
    "mosaic_gpu": [
        ("int4", 128, True, (1, 512), 128, jnp.bfloat16, None),         # decode (M padded to 64)
        ("nf4", None, True, (70, 1024), 256, jnp.float16, None),        # 2 M tiles, per-channel
        ("nf3", 512, True, (5, 2048), 64, jnp.bfloat16, None),          # 3-bit, 4 K steps
        ("int2", 256, True, (2, 3, 512), 128, jnp.bfloat16, None),      # leading axes, zero points
        ("int4", 128, True, (3, 1024), 128, jnp.bfloat16, BlockConfig(num_stages=2)),  # one weight buffer
        # Ragged K: whole 128-row steps in the kernel, the rest (64 / 76 / 104 rows) added in XLA.
        ("int4", 128, True, (3, 576), 128, jnp.bfloat16, None),         # SmolLM2's K
        ("nf4", None, True, (70, 1100), 256, jnp.float16, None),        # per-channel, K not a multiple of 8
        ("int2", 256, False, (2, 1000), 64, jnp.bfloat16, None),        # 2-bit, one 512-row step + 488 rows
        # Groups smaller than a K step: several scale rows per step, selected per slot row.
        ("int4", 64, True, (3, 1024), 128, jnp.bfloat16, None),         # 2 groups per step, zero points
        ("fp4_e2m1", 32, True, (5, 576), 128, jnp.float16, None),       # 4 per step, ragged K
        ("nf3", 256, True, (2, 2048), 64, jnp.bfloat16, None),          # 3-bit, 2 per 512-row step
        ("int2", 128, False, (3, 1024), 128, jnp.bfloat16, None),       # 2-bit, 2 per 256-row step
    ],
}


@pytest.mark.parametrize("impl,fmt,group,asym,x_shape,n,dtype,config", [
    pytest.param(i, *c, id=f"{i}-{c[0]}-g{c[1]}-x{'x'.join(map(str, c[3]))}-n{c[4]}-{jnp.dtype(c[5]).name}")
    for i, cs in SHAPES.items() for c in cs])
def test_shapes_match_reference(impl, fmt, group, asym, x_shape, n, dtype, config):
    qt = _weight(fmt, group, asym, x_shape[-1], n)
    x = _x(x_shape, dtype)
    assert why_not(impl, x, qt, config) is None
    _check(_run(impl, x, qt, config), x, qt)


def test_mosaic_gpu_double_buffers_the_weight_tile():
    from afpq_jax._src.kernels.quantized_matmul import mosaic_gpu
    # Two weight buffers (and x released a step late) from 3 pipeline stages; the 4-bit defaults get them within
    # Hopper's shared memory, 3-bit (512-row K steps) keeps one buffer and 2 stages.
    def cfg(fmt, g, m, k, n):
        prob = _prob(fmt, g, True, m=m, k=k, n=n)
        c = api.resolve("mosaic_gpu", prob, None)
        assert mosaic_gpu.smem_bytes(prob, 64, c.block_n, c.block_k, c.num_stages) <= 227 * 1024
        return c, mosaic_gpu.weight_buffers(prob, c.block_k, c.num_stages)

    for fmt, g in (("int4", 128), ("nf4", 256), ("fp4_e2m1", None), ("int2", 256)):
        for m in (1, 128):
            c, buffers = cfg(fmt, g, m, 4096, 4096)
            assert buffers == 2 and c.num_stages == 3, (fmt, g, m, c)
    c, buffers = cfg("nf3", 512, 16, 4096, 4096)
    assert buffers == 1 and c.num_stages == 2
    # A caller's wider tile gets the stage count that fits it (the default's 3 would not), and so still runs.
    for fmt, g in (("nf4", 256), ("int4", None), ("int2", 256)):
        prob = _prob(fmt, g, True, m=128, k=4096, n=4096)
        c = api.resolve("mosaic_gpu", prob, BlockConfig(block_n=128))
        assert c.block_n == 128 and c.num_stages == 2 and why_not("mosaic_gpu", _x((128, 4096), jnp.bfloat16),
                                                                   _abstract_weight(fmt, g, True, 4096, 4096),
                                                                   BlockConfig(block_n=128)) is None
    # Fewer K steps than 3: one buffer (the pipeline cannot keep 3 steps in flight).
    prob = _prob("int4", 128, True, m=1, k=256, n=128)
    assert mosaic_gpu.weight_buffers(prob, 128, 3) == 1
    # The kernel's tile loop runs several steps on both paths (buffer reuse is exercised by the numerics tests).
    for xs, k, config in ((SHAPES["mosaic_gpu"][0][3], 512, None), ((3, 1024), 1024, BlockConfig(num_stages=2))):
        prob = _prob("int4", 128, True, m=xs[0], k=k, n=128)
        assert k // api.resolve("mosaic_gpu", prob, config).block_k >= 4


def test_tpu_multi_step_configs_are_really_multi_step():
    # The shape cases above are meant to cross K-step and N-tile boundaries; make sure the plans do.
    from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
    for fmt, g, asym, xs, n, dt, cfg in SHAPES["mosaic_tpu"][:6]:
        prob = Problem.create(xs, dt, _abstract_weight(fmt, g, asym, xs[-1], n))
        plan = mosaic_tpu.plan(prob, api.resolve("mosaic_tpu", prob, cfg))
        assert plan.tiles > 1 or -(-n // plan.bn) > 1 or plan.slot_rows % plan.cr, (fmt, g, xs, n, plan)


# ---------------------------------------------------------------------------------------------------------
# Lowering for the real backends (no hardware): Mosaic TPU per chip generation, Triton and Mosaic GPU for CUDA.

LOWER_CASES = [
    ("int4", 128, True, (1, 4096), 4096, jnp.bfloat16),     # decode GEMV, AFPQ-style 4-bit
    ("nf4", 128, True, (16, 4096), 4096, jnp.bfloat16),
    ("nf3", 128, True, (16, 576), 1536, jnp.bfloat16),      # SmolLM2 shape, 3-bit
    ("fp4_e2m1", 32, False, (300, 1024), 256, jnp.float32),  # prefill-ish, several M tiles
    ("int2", None, True, (8, 2048), 512, jnp.float16),
    ("int3", 64, True, (64, 4096), 512, jnp.bfloat16),       # zero points, 3-bit
]
MOSAIC_GPU_LOWER_CASES = [
    ("int4", 128, True, (1, 4096), 4096, jnp.bfloat16),
    ("nf4", 128, True, (16, 576), 1536, jnp.bfloat16),      # ragged K: float32 kernel output plus an XLA tail
    ("int4", 64, True, (64, 4096), 512, jnp.bfloat16),       # two groups per K step (selected scale rows)
    ("nf3", 256, True, (16, 2048), 256, jnp.bfloat16),
    ("nf4", None, True, (128, 4096), 4096, jnp.bfloat16),
    ("nf3", 512, True, (64, 1024), 128, jnp.bfloat16),
    ("int3", None, False, (100, 4096), 512, jnp.bfloat16),
    ("int2", 256, True, (64, 2048), 512, jnp.float16),
]
TPU_KINDS = ("TPU v4", "TPU v5 lite", "TPU v6 lite")


def _avals(fmt, group, asym, x_shape, n, dtype):
    return jax.ShapeDtypeStruct(x_shape, dtype), _abstract_weight(fmt, group, asym, x_shape[-1], n)


def _lower(impl, avals, platform):
    f = lambda x, q: quantized_matmul(x, q, implementation=impl)  # noqa: E731
    return jax.jit(f).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


def _input_fusion_flags(text: str) -> list[str]:
    """The ``allow_input_fusion`` list of the one TPU custom call in lowered StableHLO text."""
    (flags,) = re.findall(r"allow_input_fusion\\22: \[([a-z,]+)\]", text)
    return flags.split(",")


def _custom_call_operands(text: str) -> int:
    (operands,) = re.findall(r"@tpu_custom_call\(([^)]*)\)", text)
    return len(operands.split(","))


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3][0]}-{jnp.dtype(c[5]).name}")
def test_mosaic_tpu_lowers(kind, case):
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                        abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform="tpu"))
    avals = _avals(*case)
    with use_abstract_mesh(mesh):
        text = _lower("mosaic_tpu", avals, "tpu")
    assert "tpu_custom_call" in text
    # x's permutation may be fused into the kernel's operand read; the packed weights and scales are read as stored.
    assert _input_fusion_flags(text) == ["true"] + ["false"] * (_custom_call_operands(text) - 1)


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("fmt", ["nf4", "nf3", "fp4_e2m1"])
def test_mosaic_tpu_lane_lookup_lowers(kind, fmt):
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                        abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform="tpu"))
    f = lambda x, q: quantized_matmul(x, q, implementation="mosaic_tpu", config=BlockConfig(lookup=True))  # noqa
    avals = _avals(fmt, 128, True, (16, 4096), 1024, jnp.bfloat16)  # outside the mesh (they are cached)
    with use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    # x and the table's broadcast (the last operand)
    assert _input_fusion_flags(text) == ["true"] + ["false"] * (_custom_call_operands(text) - 2) + ["true"]


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs the MLIR verifier on every Triton module the Pallas lowering builds (types, shapes, tt ops)."""
    from jax._src.pallas.triton import lowering as tl
    seen = []
    orig = tl.lower_jaxpr_to_triton_module

    def wrapped(*a, **k):
        res = orig(*a, **k)
        assert res.module.operation.verify()
        seen.append(res)
        return res

    monkeypatch.setattr(tl, "lower_jaxpr_to_triton_module", wrapped)
    return seen


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3][0]}-{jnp.dtype(c[5]).name}")
def test_triton_lowers(case, verified_triton_modules):
    text = _lower("triton", _avals(*case), "cuda")
    assert "xla.gpu.triton" in text
    assert len(verified_triton_modules) == 1


@pytest.mark.parametrize("fmt", ["nf4", "fp4_e2m1", "nf3"])
def test_triton_select_tree_lowers(fmt, verified_triton_modules):
    f = lambda x, q: quantized_matmul(x, q, implementation="triton", config=BlockConfig(lookup=False))  # noqa: E731
    text = jax.jit(f).trace(*_avals(fmt, 128, True, (16, 576), 1536, jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and len(verified_triton_modules) == 1


@pytest.mark.parametrize("case", MOSAIC_GPU_LOWER_CASES,
                         ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3][0]}-{jnp.dtype(c[5]).name}")
def test_mosaic_gpu_lowers(case):
    text = _lower("mosaic_gpu", _avals(*case), "cuda")
    assert "mosaic_gpu" in text


def _eqns_around_kernels(jaxpr) -> list:
    """The equations of a traced op, looking through the derivative wrapper (`with_reference_derivatives`'s
    custom_jvp_call) but not into kernels or loop bodies."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call":
            out += _eqns_around_kernels(eqn.params["call_jaxpr"].jaxpr)
        else:
            out.append(eqn)
    return out


def _kernel_primitives(impl, case):
    avals = _avals(*case)
    jaxpr = jax.make_jaxpr(lambda x, q: quantized_matmul(x, q, implementation=impl))(*avals)
    names = set()

    kernels = []

    def walk(j, inside):
        for eqn in j.eqns:
            is_kernel = eqn.primitive.name in ("pallas_call", "core_map", "mpmd_map")
            if is_kernel:
                kernels.append(eqn)
            if inside:
                names.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr, inside or is_kernel)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub, inside or is_kernel)

    walk(jaxpr.jaxpr, False)
    assert kernels, "no Pallas kernel in the traced op"
    return names


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_have_no_gather(impl):
    cases = [LOWER_CASES[1], LOWER_CASES[2]] if impl != "mosaic_gpu" else MOSAIC_GPU_LOWER_CASES[1:3]
    for case in cases:
        names = _kernel_primitives(impl, case)
        assert not {"gather", "dynamic_slice", "scatter"} & names, names
        assert "dot_general" in names or "wgmma" in " ".join(names)


# ---------------------------------------------------------------------------------------------------------
# ALU work per weight (`roofline.kernel_ops`): the counter against hand-counted kernels, then the kernels.

def _ops_of(kernel, *avals):
    def call(*args):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 32), jnp.float32), interpret=True)(*args)
    return roofline.kernel_ops(jax.make_jaxpr(call)(*avals))


def test_kernel_ops_counts_hand_counted_kernels():
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    codes = jax.ShapeDtypeStruct((64, 32), jnp.uint8)
    table = jax.ShapeDtypeStruct((16,), jnp.float32)

    def arithmetic(x_ref, c_ref, o_ref):  # 6 ops per weight: convert, sub, mul, then lt, mul, select_n
        w = (c_ref[...].astype(jnp.float32) - 8.0) * 0.5
        w = jnp.where(w < 0, w, 2 * w)
        o_ref[...] = jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)

    ops = _ops_of(arithmetic, x, codes)
    assert ops.by_primitive == {"convert_element_type": 1.0, "sub": 1.0, "mul": 2.0, "lt": 1.0, "select_n": 1.0}
    assert ops.ops == 6.0 and ops.loads == 0.0

    def looked_up(x_ref, c_ref, t_ref, o_ref):  # one convert, one table read per weight; x's ops are per x element
        w = t_ref[c_ref[...].astype(jnp.int32)]
        o_ref[...] = jnp.dot(x_ref[...] * 2.0, w, preferred_element_type=jnp.float32)

    ops = _ops_of(looked_up, x, codes, table)
    assert ops.loads == 1.0
    assert ops.by_primitive == {"convert_element_type": 1.0, "mul": 16 * 64 / (64 * 32)}

    def loop(x_ref, c_ref, o_ref):  # a loop body is counted once against its own multiplies
        def body(t, acc):
            w = c_ref[pl.ds(t * 32, 32), :].astype(jnp.float32)
            return acc + jnp.dot(x_ref[:, pl.ds(t * 32, 32)], w, preferred_element_type=jnp.float32)
        o_ref[...] = jax.lax.fori_loop(0, 2, body, jnp.zeros((16, 32), jnp.float32))

    ops = _ops_of(loop, x, codes)
    assert ops.by_primitive["convert_element_type"] == 1.0
    with pytest.raises(ValueError, match="no matrix multiply"):
        roofline.kernel_ops(jax.make_jaxpr(lambda a: a * 2)(x))


def test_triton_table_lookup_cuts_vector_ops():
    # NF4-asym decode: the select tree costs ~30 vector ops per weight; the table load leaves < 8 and one lookup.
    avals = _avals("nf4", 128, True, (1, 4096), 4096, jnp.bfloat16)

    def ops(impl, config=None):
        f = lambda x, q: quantized_matmul(x, q, implementation=impl, config=config)  # noqa: E731
        return roofline.kernel_ops(jax.make_jaxpr(f)(*avals))

    lut, tree = ops("triton"), ops("triton", BlockConfig(lookup=False))
    assert lut.loads == 1.0 and lut.ops < 8 and "select_n" in lut.by_primitive
    assert tree.loads == 0.0 and tree.ops > 25 and tree.by_primitive["select_n"] >= 15
    assert ops("mosaic_tpu").ops > 25  # TPU's default keeps the select tree
    tpu_lut = ops("mosaic_tpu", BlockConfig(lookup=True))  # opt-in lane gather: one gather op per weight
    assert tpu_lut.ops < 8 and tpu_lut.by_primitive["gather"] == 1.0 and "select_n" in tpu_lut.by_primitive
    # Mosaic GPU: the same per-weight count with one or two weight buffers (a multiply reads one buffer).
    double, single = ops("mosaic_gpu"), ops("mosaic_gpu", BlockConfig(num_stages=2))
    assert double.ops == pytest.approx(single.ops) and double.ops > 25


def test_triton_reads_x_unpermuted():
    # x goes into the kernel as it is: no XLA-side permutation (pad / transpose) around the Triton call.
    from afpq_jax.kernels import quantized_matmul_a8
    for case in (LOWER_CASES[0], LOWER_CASES[2], LOWER_CASES[3]):
        for op in (quantized_matmul, lambda x, q, implementation: quantized_matmul_a8(x, q, None,
                                                                                      implementation=implementation)):
            if case[0] == "nf3" and op is not quantized_matmul:
                continue  # NF3 has no integer levels (no W·A8)
            jaxpr = jax.make_jaxpr(lambda x, q: op(x, q, implementation="triton"))(*_avals(*case))
            outer = {e.primitive.name for e in _eqns_around_kernels(jaxpr.jaxpr)}
            assert "pallas_call" in outer and not {"pad", "transpose"} & outer, outer


# ---------------------------------------------------------------------------------------------------------
# Dispatch.

def _prob(fmt="int4", group=128, asym=True, m=4, k=1024, n=256, dtype=jnp.bfloat16):
    return Problem.create((m, k), dtype, _abstract_weight(fmt, group, asym, k, n))


def test_cpu_dispatch_by_size_and_dtype():
    qt = _weight("nf4", 128, True, 576, 200)

    def pick(m, dtype=jnp.float32):
        return select_implementation(Problem.create((m, 576), dtype, qt), backend="cpu")[0]

    assert pick(1) == pick(256) == "cpu"
    assert pick(257) == "xla"  # the C++ kernel's size rule
    assert pick(1, jnp.bfloat16) == "cpu"
    assert pick(1, jnp.float16) == "xla"  # the C++ kernel takes float32 or bfloat16 x
    x = _x((2, 576), jnp.float32)
    ref = quantizer.dequantize(qt, jnp.float32)
    np.testing.assert_allclose(np.asarray(quantized_matmul(x, qt)), np.asarray(x) @ np.asarray(ref),
                               rtol=1e-5, atol=1e-4)
    # size rules are dispatch preferences: a named implementation runs any M
    _check(quantized_matmul(_x((70, 576), jnp.float32), qt, implementation="cpu"), _x((70, 576), jnp.float32), qt)


def test_dispatch_order_per_backend():
    assert api.DISPATCH_ORDER == {"tpu": ("mosaic_tpu", "xla"), "gpu": ("triton", "mosaic_gpu", "xla"),
                                  "cpu": ("cpu", "xla")}
    assert select_implementation(_prob(), backend="tpu")[0] == "mosaic_tpu"
    assert select_implementation(_prob(), backend="gpu")[0] == "triton"
    assert select_implementation(_prob(dtype=jnp.float32), backend="cpu")[0] == "cpu"
    assert select_implementation(_prob(), backend="something-else")[0] == "xla"


def test_gpu_dispatch_by_size(caplog):
    # Prefill (M >= 128 rows after flattening): dequantize once and the library GEMM, measured faster on an H200;
    # no fallback warning (a preference, not a decline). A named kernel still runs any M.
    api.REGISTRY.log_declines_again()
    with caplog.at_level(logging.WARNING, logger="afpq_jax.kernels"):
        for m, x_shape in ((1, (1, 1024)), (127, (127, 1024)), (128, (128, 1024)), (2048, (4, 512, 1024))):
            prob = Problem.create(x_shape, jnp.bfloat16, _abstract_weight("nf4", 128, True, 1024, 256))
            assert prob.m == m
            assert select_implementation(prob, backend="gpu")[0] == ("triton" if m < 128 else "xla"), m
    # Mosaic GPU (next in line, and it takes NF4 g128 bf16) has the same rule, or it would win at M = 128 above.
    assert IMPLEMENTATIONS["mosaic_gpu"].preferred(_prob(m=127)) is None
    assert "M=128" in IMPLEMENTATIONS["mosaic_gpu"].preferred(_prob(m=128))
    assert "declined" not in caplog.text
    qt = _weight("int4", 128, True, 256, 64)
    x = _x((130, 256), jnp.float32)
    _check(_run("triton", x, qt), x, qt)


def test_fallback_logs_once(caplog):
    api.REGISTRY.log_declines_again()
    prob = _prob("nf3", 32, True)  # 3-bit groups of 32: declined by Mosaic TPU
    with caplog.at_level(logging.INFO, logger="afpq_jax.kernels"):
        assert select_implementation(prob, backend="tpu")[0] == "xla"
        assert select_implementation(prob, backend="tpu")[0] == "xla"
    recs = [r for r in caplog.records if r.name == "afpq_jax.kernels"]
    assert len(recs) == 1 and "mosaic_tpu declined" in recs[0].getMessage() and "using xla" in recs[0].getMessage()


def test_gpu_fallback_chain(caplog):
    api.REGISTRY.log_declines_again()
    # Group of 96 rows: not a power of two (Triton) and not a WGMMA-sized group (Mosaic GPU) -> xla.
    prob = _prob("int4", 96, True, k=960)
    with caplog.at_level(logging.INFO, logger="afpq_jax.kernels"):
        assert select_implementation(prob, backend="gpu")[0] == "xla"
    msgs = [r.getMessage() for r in caplog.records if r.name == "afpq_jax.kernels"]
    assert len(msgs) == 2 and "triton declined" in msgs[0] and "using mosaic_gpu" in msgs[0]
    assert "mosaic_gpu declined" in msgs[1] and "using xla" in msgs[1]
    # f32 x: Triton takes it; Mosaic GPU would decline (no exact f32 WGMMA).
    assert select_implementation(_prob(dtype=jnp.float32), backend="gpu")[0] == "triton"
    assert "float32" in IMPLEMENTATIONS["mosaic_gpu"].supports(_prob(dtype=jnp.float32),
                                                               api.resolve("mosaic_gpu", _prob(dtype=jnp.float32),
                                                                            None))


def test_stacked_weights_fall_back():
    w = jax.random.normal(jax.random.key(0), (2, 256, 128), jnp.float32)
    qt = afpq_jax.quantize(w, "int4", group_size=128, asym=True)
    x = _x((2, 5, 256), jnp.float32)
    for impl in KERNELS:
        assert "stacked" in why_not(impl, x, qt)
    y = quantized_matmul(x, qt)  # CPU: xla, batched matmul semantics
    ref = jnp.einsum("bmk,bkn->bmn", x, quantizer.dequantize(qt), precision="highest")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
    with pytest.raises(NotImplementedError, match="stacked"):
        quantized_matmul(x, qt, implementation="triton", interpret=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_vmap_over_stacked_weights(impl):
    w = jax.random.normal(jax.random.key(0), (2, 512, 128), jnp.float32)
    qt = afpq_jax.quantize(w, "nf4", group_size=256, asym=True)
    x = _x((2, 3, 512), jnp.bfloat16)
    y = jax.jit(jax.vmap(lambda x, q: quantized_matmul(x, q, implementation=impl, interpret=INTERPRET)))(x, qt)
    ref = quantized_matmul(x, qt)  # xla, batched matmul
    for b in range(2):
        _check(y[b], x[b], jax.tree.map(lambda a: a[b], qt), ref[b])


@pytest.mark.parametrize("impl", ["cpu", *KERNELS])
def test_kernels_differentiate_like_xla(impl):
    """Pallas and FFI kernels have no derivative rules of their own; they take the "xla" path's. With a loss
    linear in the output the cotangent is the same for every implementation, so the gradients (x and the float
    scales) and the JVP equal xla's exactly. Dispatch (implementation=None) picks the C++ kernel at M = 4 on CPU,
    which raised "cannot be differentiated" before."""
    k, n, dt = (1024, 128, jnp.bfloat16) if impl == "mosaic_gpu" else (256, 128, jnp.float32)
    if impl == "cpu" and IMPLEMENTATIONS["cpu"].supports(_prob("nf4", 64, m=4, k=k, n=n, dtype=dt), BlockConfig()):
        pytest.skip("the C++ kernel cannot be built here")
    qt = _weight("nf4", 64 if impl != "mosaic_gpu" else 256, True, k, n)
    x = _x((4, k), dt)
    c = _x((4, n), dt, seed=2)

    def loss(impl, interpret):
        return lambda x, q: jnp.sum((quantized_matmul(x, q, implementation=impl, interpret=interpret) * c)
                                    .astype(jnp.float32))

    want = jax.grad(loss("xla", False), argnums=(0, 1), allow_int=True)(x, qt)
    runs = [(impl, INTERPRET and impl != "cpu")] + ([(None, False)] if impl == "cpu" else [])
    for name, interpret in runs:
        got = jax.jit(jax.grad(loss(name, interpret), argnums=(0, 1), allow_int=True))(x, qt)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        for field in ("scale", "scale_neg"):
            np.testing.assert_array_equal(np.asarray(getattr(got[1], field)), np.asarray(getattr(want[1], field)))
        _, tangent = jax.jvp(lambda x: quantized_matmul(x, qt, implementation=name, interpret=interpret), (x,), (x,))
        np.testing.assert_array_equal(np.asarray(tangent), np.asarray(quantized_matmul(x, qt, implementation="xla")))


@pytest.mark.parametrize("impl", ["mosaic_tpu", "triton"])
def test_a8_kernels_differentiate_like_xla(impl):
    from afpq_jax.kernels import quantized_matmul_a8
    qt = _weight("int4", 64, True, 256, 128)
    x, c = _x((4, 256), jnp.float32), _x((4, 128), jnp.float32, seed=2)

    def grad(impl, interpret):
        return jax.grad(lambda x: jnp.sum(quantized_matmul_a8(x, qt, implementation=impl, interpret=interpret) * c))(x)

    np.testing.assert_array_equal(np.asarray(grad(impl, INTERPRET)), np.asarray(grad("xla", False)))


def test_mosaic_gpu_refuses_devices_without_wgmma():
    from types import SimpleNamespace
    from afpq_jax._src.kernels.quantized_matmul.mosaic_gpu import device_refusal

    def gpu(kind, capability):
        return [SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)]

    assert device_refusal(gpu("NVIDIA H100 80GB HBM3", "9.0")) is None
    assert "has 8.0" in device_refusal(gpu("NVIDIA A100-SXM4-80GB", "8.0"))
    assert "has 10.0" in device_refusal(gpu("NVIDIA B200", "10.0"))
    assert "not a CUDA device" in device_refusal(gpu("AMD Instinct MI300X", "gfx942"))
    assert device_refusal([SimpleNamespace(platform="cpu", device_kind="cpu")]) is None  # interpret mode
    assert device_refusal() is None  # this machine: CPU


def test_why_not_names_unknown_implementations_and_the_op_takes_array_likes():
    qt = _weight("int4", 128, True, 256, 128)
    x = _x((2, 256), jnp.float32)
    with pytest.raises(afpq_jax.InputError, match="unknown implementation"):
        why_not("cuda", x, qt)
    np.testing.assert_array_equal(quantized_matmul(np.asarray(x), qt), quantized_matmul(x, qt))


@pytest.mark.parametrize("impl,fmt,group", [("mosaic_tpu", "nf3", 32), ("mosaic_tpu", "int4", 96),
                                            ("triton", "int4", 96), ("mosaic_gpu", "int4", 96),
                                            ("mosaic_gpu", "nf3", 128), ("mosaic_gpu", "int3", 512)])
def test_documented_declines(impl, fmt, group):
    qt = _weight(fmt, group, True, 1152, 128)
    x = _x((2, 1152), jnp.bfloat16)
    assert why_not(impl, x, qt) is not None
    with pytest.raises(NotImplementedError, match=impl):
        quantized_matmul(x, qt, implementation=impl, interpret=True)


def test_mosaic_tpu_lookup_needs_lane_aligned_tiles():
    qt = _weight("nf4", 128, True, 256, 130)  # N = 130: one full-width, not lane-aligned block
    x = _x((2, 256), jnp.float32)
    assert "multiple of 128" in why_not("mosaic_tpu", x, qt, BlockConfig(lookup=True))
    assert why_not("mosaic_tpu", x, qt) is None  # the default decode takes it


def test_bad_arguments():
    qt = _weight("int4", 128, True, 256, 128)
    with pytest.raises(ValueError, match="unknown implementation"):
        quantized_matmul(_x((1, 256), jnp.float32), qt, implementation="cuda_magic")
    with pytest.raises(TypeError, match="float"):
        quantized_matmul(jnp.ones((1, 256), jnp.int32), qt)
    with pytest.raises(ValueError, match="in_features"):
        quantized_matmul(_x((1, 255), jnp.float32), qt)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        quantized_matmul(_x((1, 256), jnp.float32), jnp.ones((256, 128)))
    with pytest.raises(NotImplementedError, match="block_n"):
        quantized_matmul(_x((1, 256), jnp.float32), qt, implementation="mosaic_tpu",
                         config=BlockConfig(block_n=100), interpret=True)


def test_registry_accepts_custom_implementation():
    class Doubling:
        name, backend = "test_doubling", "any"

        def supports(self, prob, config):
            return None

        def __call__(self, x2d, qt, prob, config, *, interpret=False):
            return 2 * quantized_matmul(x2d, qt, implementation="xla")

    api.register_implementation(Doubling())
    try:
        with pytest.raises(ValueError, match="already registered"):
            api.register_implementation(Doubling())
        qt = _weight("int4", 128, True, 256, 128)
        x = _x((3, 256), jnp.float32)
        np.testing.assert_allclose(np.asarray(quantized_matmul(x, qt, implementation="test_doubling")),
                                   2 * np.asarray(quantized_matmul(x, qt)), rtol=1e-6)
    finally:
        del api.IMPLEMENTATIONS["test_doubling"]


def test_config_resolve_keeps_overrides():
    prob = _prob()
    d = api.resolve("mosaic_tpu", prob, None)
    assert d == api.default_config("mosaic_tpu", prob) and None not in (d.block_m, d.block_n, d.block_k)
    c = api.resolve("mosaic_tpu", prob, BlockConfig(block_n=128))
    assert c.block_n == 128 and c.block_k == d.block_k
    with pytest.raises(dataclasses_FrozenInstanceError()):
        d.block_n = 1  # type: ignore[misc]
    # Defaults are valid: every format at decode and prefill shapes (Mosaic GPU: its documented group scope).
    for impl in KERNELS:
        for fmt in FORMATS:
            bits = afpq_jax.formats.get_format(fmt).bits
            groups = (None, 64 * {4: 2, 3: 8, 2: 4}[bits]) if impl == "mosaic_gpu" else (None, 64, 128)
            for g in groups:
                for m, dt in ((1, jnp.bfloat16), (512, jnp.bfloat16), (16, jnp.float32)):
                    if impl == "mosaic_gpu" and (dt == jnp.float32 or fmt == "int3"):
                        continue  # f32 x and INT3-asym are documented declines
                    p = _prob(fmt, g, True, m=m, k=4096, n=4096, dtype=dt)
                    assert IMPLEMENTATIONS[impl].supports(p, api.resolve(impl, p, None)) is None, (impl, fmt, g, m)


def dataclasses_FrozenInstanceError():
    import dataclasses
    return dataclasses.FrozenInstanceError


# ---------------------------------------------------------------------------------------------------------
# Roofline helpers.

def test_roofline_numbers():
    wb = roofline.weight_bits("nf4", 128, True)
    assert wb.bits == pytest.approx(4.25) and wb.bound_vs_bf16 == pytest.approx(16 / 4.25)
    assert roofline.weight_bits("int4", 128, True).bits == pytest.approx(4 + 24 / 128)
    assert roofline.weight_bits("int4", 128, False).bits == pytest.approx(4 + 16 / 128)
    assert roofline.weight_bits("nf3", None, True, k=4096).bits == pytest.approx(3 + 32 / 4096)
    assert roofline.hbm_bandwidth("TPU v5 lite") == 819e9 and roofline.hbm_bandwidth("NVIDIA H100 80GB HBM3")
    # Decode at K=N=4096: the TPU plan reads the weight exactly once and x once (resident): within 2% of ideal.
    for fmt, g in (("int4", 128), ("nf3", 128), ("int2", None), ("fp4_e2m1", 32)):
        for m in (1, 16):
            prob = _prob(fmt, g, True, m=m, k=4096, n=4096)
            got = roofline.kernel_hbm_bytes("mosaic_tpu", prob, api.resolve("mosaic_tpu", prob, None))
            assert got["total"] - got["x_prep"] <= 1.01 * roofline.ideal_bytes(prob), (fmt, g, m, got)
            assert got["x_prep"] <= 2 * m * 4096 * 2 * 1.01  # the XLA permutation pass: read x, write a copy
    # Triton decode: split-K for parallelism, partial sums bounded; weights and scales once, no M padding.
    cfg = api.resolve("triton", _prob("nf4", 128, True, m=1, k=4096, n=4096), None)
    assert cfg.split_k > 1 and api.resolve("triton", _prob(m=512, k=4096, n=4096), None).split_k == 1
    prob = _prob("nf4", 128, True, m=1, k=4096, n=4096)
    got = roofline.kernel_hbm_bytes("triton", prob, api.resolve("triton", prob, None))
    assert got["codes"] + got["scales"] == pytest.approx(roofline.ideal_bytes(prob) - 2 * (4096 + 4096))
    assert got["x_prep"] == 0 and got["x"] == 2 * 4096  # x read as it is, once from HBM


# ---------------------------------------------------------------------------------------------------------
# W·A8 (`quantized_matmul_a8`): the Triton kernel against the XLA integer path, lowering, dispatch.

A8_FORMATS = (("int4", True), ("int4", False), ("fp4_e2m1", True), ("fp4_e2m1", False), ("int8", False))


def _a8(impl, x, qt, scale, config=None):
    from afpq_jax.kernels import quantized_matmul_a8
    return jax.jit(lambda x, q, s: quantized_matmul_a8(x, q, s, implementation=impl, config=config,
                                                       interpret=INTERPRET))(x, qt, scale)


_A8_SHAPES = [((3, 7, 200), 80, jnp.bfloat16, 32),  # M, N and K tails
              ((1, 256), 64, jnp.float32, 128),  # decode
              ((5, 96), 48, jnp.bfloat16, None)]  # per-channel
# every format on the tail shape; the asymmetric formats (two scales / zero points) on the others
A8_CASES = ([(f, a, st, *_A8_SHAPES[0], False) for f, a in A8_FORMATS for st in (False, True)]
            + [(f, True, st, *shape, False) for shape in _A8_SHAPES[1:] for f in ("int4", "fp4_e2m1")
               for st in (False, True)]
            # integer group scales: one int8 tile per slot, one int32 accumulator over K
            + [(f, True, False, *_A8_SHAPES[0], True) for f in ("int4", "fp4_e2m1")]
            + [("fp4_e2m1", False, True, *_A8_SHAPES[0], True), ("fp4_e2m1", True, False, *_A8_SHAPES[2], True)])


@pytest.mark.parametrize("impl", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize("fmt,asym,static,x_shape,n,dtype,group,integer_scales", A8_CASES,
                         ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_a8_kernels_match_xla(impl, fmt, asym, static, x_shape, n, dtype, group, integer_scales):
    qt = _weight(fmt, group, asym, x_shape[-1], n, integer_scales=integer_scales)
    x = _x(x_shape, dtype) * 3
    scale = jnp.float32(0.02) if static else None  # static: some activations saturate at +-127
    # Triton decode runs with 64-row K tiles: two tiles per group (int32 sums carried across tiles, then flushed)
    config = BlockConfig(block_k=64) if group == 128 and impl == "triton" else None
    y, ref = _a8(impl, x, qt, scale, config), _a8("xla", x, qt, scale)
    assert y.shape == ref.shape == (*x_shape[:-1], n) and y.dtype == ref.dtype == x.dtype
    # the int32 group sums are identical; only the float epilogue's order (and the output rounding) differs
    w = np.abs(np.asarray(quantizer.dequantize(qt, jnp.float32)))
    bound = 2e-6 * (np.abs(np.asarray(x, np.float32)).reshape(-1, x_shape[-1]) @ w)
    eps_out = 0.0 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    y32, r32 = (np.asarray(v, np.float32).reshape(-1, n) for v in (y, ref))
    assert np.all(np.abs(y32 - r32) <= bound + eps_out * np.abs(r32) + 1e-30)


@pytest.mark.parametrize("asym,integer_scales", [(True, False), (False, False), (True, True)])
def test_a8_triton_arithmetic_levels(asym, integer_scales):
    # FP4 integer levels by E2M1 arithmetic (lookup=False) instead of the table load: the same int32 sums.
    qt = _weight("fp4_e2m1", 32, asym, 200, 80, integer_scales=integer_scales)
    x = _x((3, 7, 200), jnp.bfloat16) * 3
    y = _a8("triton", x, qt, None, BlockConfig(lookup=False))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_a8("triton", x, qt, None), np.float32))
    ref = np.asarray(_a8("xla", x, qt, None), np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt,asym,integer_scales", [(f, a, False) for f, a in A8_FORMATS[:4]]
                         + [("int4", True, True), ("fp4_e2m1", True, True)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 128])
def test_a8_triton_lowers(fmt, asym, integer_scales, static, m, verified_triton_modules):
    from afpq_jax.kernels import quantized_matmul_a8
    avals = (jax.ShapeDtypeStruct((m, 512), jnp.bfloat16),
             _abstract_weight(fmt, 128, asym, 512, 256, integer_scales))
    f = lambda x, q: quantized_matmul_a8(x, q, jnp.float32(0.05) if static else None,  # noqa: E731
                                         implementation="triton")
    text = jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and len(verified_triton_modules) == 1


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("case", [("int4", 128, True, 1, 4096, 4096, False),
                                  ("fp4_e2m1", 128, True, 128, 576, 1536, False),
                                  ("fp4_e2m1", 32, False, 16, 1024, 256, False), ("int8", None, False, 8, 512, 256, False),
                                  ("int4", 128, True, 1, 4096, 4096, True), ("fp4_e2m1", 32, True, 16, 1024, 256, True)],
                         ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3]}{'-intscales' if c[6] else ''}")
@pytest.mark.parametrize("static", [False, True])
def test_a8_mosaic_tpu_lowers(kind, case, static):
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
    from afpq_jax.kernels import quantized_matmul_a8
    fmt, group, asym, m, k, n, integer_scales = case
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                        abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform="tpu"))
    avals = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), _abstract_weight(fmt, group, asym, k, n, integer_scales))
    f = lambda x, q: quantized_matmul_a8(x, q, jnp.float32(0.05) if static else None,  # noqa: E731
                                         implementation="mosaic_tpu")
    with use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    weights = 2 + int(asym)  # codes, scale, and s_neg or zero points; then the channel / input scale broadcasts
    assert _input_fusion_flags(text) == ["true"] + ["false"] * weights + ["true"] * (int(integer_scales) + int(static))
    assert _custom_call_operands(text) == 1 + weights + int(integer_scales) + int(static)


def test_a8_dispatch_and_declines():
    from afpq_jax.kernels import quantized_matmul_a8
    from afpq_jax._src.kernels.quantized_matmul_a8 import why_not as a8_why_not
    x = _x((2, 64), jnp.float32)
    qt = _weight("int4", 32, True, 64, 32)
    np.testing.assert_array_equal(quantized_matmul_a8(x, qt), _a8("xla", x, qt, None))  # CPU: the XLA path
    assert a8_why_not("triton", x, qt) is None
    small = _weight("int3", 32, True, 64, 32)  # 3-bit: 8 rows per byte, a 32-row tile is under tl.dot's minimum
    assert "power of two" in a8_why_not("triton", x, small)
    assert "3-bit" in a8_why_not("mosaic_tpu", x, small)
    with pytest.raises(NotImplementedError, match="does not support"):
        quantized_matmul_a8(x, small, implementation="triton", interpret=True)
    nf = _weight("nf4", 32, True, 64, 32)
    assert "no integer levels" in a8_why_not("triton", x, nf)
    with pytest.raises(afpq_jax.InputError, match="no exact int8 representation"):
        quantized_matmul_a8(x, nf)
    with pytest.raises(afpq_jax.InputError, match="scalar"):
        quantized_matmul_a8(x, qt, jnp.ones((2,)))
    for scale in (0.0, -1.0):
        with pytest.raises(afpq_jax.InputError, match="must be positive"):
            quantized_matmul_a8(x, qt, jnp.float32(scale))
    with pytest.raises(TypeError, match="float activations"):
        quantized_matmul_a8(x.astype(jnp.int32), qt)


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
    qt = _weight(fmt, group, asym, 1003, 1100)
    for m in (1, 2, 4, 13):
        x = _x((m, 1003), jnp.float32)
        _check(quantized_matmul(x, qt, implementation="cpu"), x, qt)


def test_cpu_kernel_shapes_and_transforms():
    qt = _weight("nf3", 64, True, 200, 600)
    for shape in [(1, 200), (2, 3, 200), (300, 200)]:  # leading axes flatten; M past the size rule
        x = _x(shape, jnp.float32)
        _check(jax.jit(lambda a, q: quantized_matmul(a, q, implementation="cpu"))(x, qt), x, qt)
    xs = _x((3, 2, 200), jnp.float32)
    y = jax.vmap(lambda a: quantized_matmul(a, qt, implementation="cpu"))(xs)
    _check(y.reshape(6, -1), xs.reshape(6, 200), qt)
    assert "float32 or bfloat16 x" in why_not("cpu", _x((1, 200), jnp.float16), qt)


@pytest.mark.parametrize("fmt,group,asym", [("int4", 128, True), ("nf4", 64, True), ("fp4_e2m1", None, False),
                                            ("nf3", 32, True), ("int3", 128, False)])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_cpu_kernel_bfloat16_x(fmt, group, asym, m):
    """bfloat16 x: weights rounded to bfloat16 in the kernel, float32 sums, a bfloat16 result (the contract)."""
    qt = _weight(fmt, group, asym, 1003, 1100)
    x = _x((m, 1003), jnp.bfloat16)
    y = quantized_matmul(x, qt, implementation="cpu")
    _check(y, x, qt)
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
def test_cpu_kernel_portable_path(tmp_path):
    """The kernel built without AVX-512 (the path other machines compile) gives the same numerics."""
    code = """
import jax, jax.numpy as jnp, numpy as np, afpq_jax
from afpq_jax.kernels import quantized_matmul
worst = 0.0
for fmt, g, asym, dt in [("int4", 128, True, jnp.float32), ("nf3", 32, True, jnp.float32),
                         ("fp4_e2m1", None, False, jnp.float32), ("int3", 64, False, jnp.float32),
                         ("nf4", 128, True, jnp.bfloat16)]:
    qt = afpq_jax.quantize(jax.random.normal(jax.random.key(0), (300, 130)), fmt, group_size=g, asym=asym)
    x = jax.random.normal(jax.random.key(1), (3, 300)).astype(dt)
    y = np.asarray(quantized_matmul(x, qt, implementation="cpu").astype(jnp.float32), np.float64)
    w = np.asarray(afpq_jax.dequantize(qt, dt).astype(jnp.float32), np.float64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref = x64 @ w
    eps = 2.0**-8 if dt == jnp.bfloat16 else 0.0  # the bfloat16 result's rounding
    worst = max(worst, float((np.abs(y - ref) / (eps * np.abs(ref) + 1e-5 * (np.abs(x64) @ np.abs(w)) + 1e-30)).max()))
print(worst)
"""
    env = {**os.environ, "AFPQ_CPU_KERNEL_ARCH": "x86-64-v2", "AFPQ_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) <= 1.0  # within the suite's bound: 1e-5 * |x| @ |w|
    built = list((tmp_path / "kernels").glob("afpq_cpu_*.so"))
    assert len(built) == 1


@pytest.mark.parametrize("fmt,group,asym,k,n,dtype", [("int4", 128, True, 576, 160, jnp.float32),
                                                     ("nf3", 32, True, 100, 40, jnp.bfloat16),
                                                     ("int3", 128, False, 300, 72, jnp.float32),
                                                     ("fp4_e2m1", None, False, 200, 64, jnp.float32),
                                                     ("nf4", 64, True, 256, 96, jnp.float32)])
def test_xla_scan_equals_the_reference(fmt, group, asym, k, n, dtype):
    qt = _weight(fmt, group, asym, k, n)
    x = _x((3, k), dtype)
    # several groups per chunk (g <= 64), or a chunk inside a group (g = 128 with 64-row chunks)
    config = BlockConfig(block_k=64) if group is not None and (group <= 64 or fmt == "int3") else None
    y = quantized_matmul(x, qt, implementation="xla_scan", config=config)
    ref = quantized_matmul(x, qt, implementation="xla")
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # the same dequantized values; only the order of the float32 sum differs (per-chunk partial dots)
    _check(y, x, qt, ref)


# ---------------------------------------------------------------------------------------------------------
# Measured tilings (`tuning`): the table, dispatch's use of it, the autotuning script.

def _scan_chunks(impl, x, qt, config=None):
    jaxpr = jax.make_jaxpr(lambda a, q: quantized_matmul(a, q, implementation=impl, config=config))(x, qt)
    return [e.params["length"] for e in _eqns_around_kernels(jaxpr.jaxpr) if e.primitive.name == "scan"]


def test_tuned_tiling_is_used_under_the_callers_fields_and_dropped_when_declined(tmp_path, monkeypatch):
    from afpq_jax.kernels import tuning
    monkeypatch.setenv("AFPQ_TUNED_CONFIGS", str(tmp_path / "table.json"))
    qt = _weight("nf4", 128, True, 1024, 256)
    x = _x((3, 1024), jnp.float32)
    prob = Problem.create(x.shape, x.dtype, qt)
    kind = jax.devices()[0].device_kind
    assert tuning.tuned("xla_scan", prob) is None and tuning.load() == {}
    default_chunks = _scan_chunks("xla_scan", x, qt)
    tuning.record({tuning.shape_key("xla_scan", prob, kind): BlockConfig(block_k=256)})
    assert tuning.tuned("xla_scan", prob) == BlockConfig(block_k=256)
    assert tuning.shape_key("xla_scan", Problem.create((4, 1024), x.dtype, qt), kind) == \
        tuning.shape_key("xla_scan", prob, kind)  # M = 3 and 4 share the bucket
    assert _scan_chunks("xla_scan", x, qt) == [4] != default_chunks  # the measured tiling is used
    assert _scan_chunks("xla_scan", x, qt, BlockConfig(block_k=512)) == [2]  # the caller's field wins
    _check(quantized_matmul(x, qt, implementation="xla_scan"), x, qt)
    # An entry the kernel declines (Triton needs power-of-two tiles) is dropped: the defaults apply.
    tuning.record({tuning.shape_key("triton", prob, kind): BlockConfig(block_n=24)})
    assert api.resolve_tuned("triton", prob, None) == api.resolve("triton", prob, None)
    (tmp_path / "table.json").write_text("{not json")
    with pytest.raises(afpq_jax.InputError, match="not valid JSON"):
        tuning.load()


def test_autotune_script_records_the_fastest_tiling(tmp_path):
    out = tmp_path / "table.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.autotune", "--impl", "xla_scan", "--m", "2",
                        "--k", "512", "--n", "256", "--formats", "int4", "--x-dtype", "float32", "--reps", "1",
                        "--out", str(out)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = __import__("json").loads(out.read_text())
    (key, fields), = table.items()
    assert key.endswith("|xla_scan|int4-asym-g128|float32|m2|k512|n256") and set(fields) == {"block_k"}
    assert "| int4-asym-g128 | 2 |" in r.stdout
