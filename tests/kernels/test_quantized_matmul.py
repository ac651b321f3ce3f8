"""`quantized_matmul`'s Pallas kernels (interpret mode) against the "xla" reference, their lowering, derivatives and
roofline."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import afpq_jax
from afpq_jax._src.kernels.quantized_matmul import api, roofline
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from afpq_jax.kernels import IMPLEMENTATIONS, BlockConfig, quantized_matmul, why_not
from tests.kernels.support import (FORMATS, INTERPRET, KERNELS, NATIVE, TPU_KINDS, abstract_weight,
                                   check_against_reference, custom_call_operands, eqns_around_kernels,
                                   input_fusion_flags, make_problem, make_weight, make_x, on_tpu, run_impl)

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
    qt = make_weight(fmt, group, asym, k, n)
    x = make_x((m, k), dt)
    check_against_reference(run_impl(impl, x, qt), x, qt)


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
        # The GEMV variant (block_m < 16): one row, 2 and 4 rows (3 rows: one re-read, never stored), K tails,
        # split-K, 3-bit, float32 x, the select tree.
        ("int4", 128, True, (1, 1024), 256, jnp.bfloat16, BlockConfig(block_m=1)),
        ("nf4", 128, True, (3, 1040), 300, jnp.bfloat16, BlockConfig(block_m=4, split_k=2)),
        ("nf3", 64, True, (2, 576), 96, jnp.float32, BlockConfig(block_m=2, lookup=False)),
        ("int3", 128, False, (1, 1000), 64, jnp.bfloat16, BlockConfig(block_m=1, block_k=128)),
        # Split-K partial sums added atomically into one (tile-padded) float32 output: M, N and K tails, GEMV.
        ("nf4", 128, True, (3, 1040), 300, jnp.bfloat16, BlockConfig(block_k=128, split_k=4, split_k_atomic=True)),
        ("int4", 64, False, (1, 1024), 200, jnp.float32, BlockConfig(block_m=1, split_k=8, split_k_atomic=True)),
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
    qt = make_weight(fmt, group, asym, x_shape[-1], n)
    x = make_x(x_shape, dtype)
    assert why_not(impl, x, qt, config) is None
    check_against_reference(run_impl(impl, x, qt, config), x, qt)


def test_mosaic_gpu_double_buffers_the_weight_tile():
    from afpq_jax._src.kernels.quantized_matmul import mosaic_gpu
    # Two weight buffers (and x released a step late) from 3 pipeline stages; the 4-bit defaults get them within
    # Hopper's shared memory, 3-bit (512-row K steps) keeps one buffer and 2 stages.
    def cfg(fmt, g, m, k, n):
        prob = make_problem(fmt, g, True, m=m, k=k, n=n)
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
        prob = make_problem(fmt, g, True, m=128, k=4096, n=4096)
        c = api.resolve("mosaic_gpu", prob, BlockConfig(block_n=128))
        assert c.block_n == 128 and c.num_stages == 2 and why_not("mosaic_gpu", make_x((128, 4096), jnp.bfloat16),
                                                                   abstract_weight(fmt, g, True, 4096, 4096),
                                                                   BlockConfig(block_n=128)) is None
    # Fewer K steps than 3: one buffer (the pipeline cannot keep 3 steps in flight).
    prob = make_problem("int4", 128, True, m=1, k=256, n=128)
    assert mosaic_gpu.weight_buffers(prob, 128, 3) == 1
    # The kernel's tile loop runs several steps on both paths (buffer reuse is exercised by the numerics tests).
    for xs, k, config in ((SHAPES["mosaic_gpu"][0][3], 512, None), ((3, 1024), 1024, BlockConfig(num_stages=2))):
        prob = make_problem("int4", 128, True, m=xs[0], k=k, n=128)
        assert k // api.resolve("mosaic_gpu", prob, config).block_k >= 4


def test_tpu_multi_step_configs_are_really_multi_step():
    # The shape cases above are meant to cross K-step and N-tile boundaries; make sure the plans do.
    from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
    for fmt, g, asym, xs, n, dt, cfg in SHAPES["mosaic_tpu"][:6]:
        prob = Problem.create(xs, dt, abstract_weight(fmt, g, asym, xs[-1], n))
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


def _avals(fmt, group, asym, x_shape, n, dtype):
    return jax.ShapeDtypeStruct(x_shape, dtype), abstract_weight(fmt, group, asym, x_shape[-1], n)


def _lower(impl, avals, platform):
    f = lambda x, q: quantized_matmul(x, q, implementation=impl)  # noqa: E731
    return jax.jit(f).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3][0]}-{jnp.dtype(c[5]).name}")
def test_mosaic_tpu_lowers(kind, case):
    avals = _avals(*case)
    with on_tpu(kind):
        if case[5] == jnp.float16 and kind != "TPU v6 lite":  # no 16-bit vector unit before v6e: declined
            assert "float16 x on TPU v" in why_not("mosaic_tpu", *avals)
            return
        text = _lower("mosaic_tpu", avals, "tpu")
    assert "tpu_custom_call" in text
    # x's permutation may be fused into the kernel's operand read; the packed weights and scales are read as stored.
    assert input_fusion_flags(text) == ["true"] + ["false"] * (custom_call_operands(text) - 1)


def test_mosaic_tpu_asks_for_the_vmem_its_tiling_needs():
    """``vmem_limit_bytes`` (the custom call's scoped VMEM) from the tiling's estimate: at least 32 MiB, twice
    the estimate for a large tiling, never more than 90% of the chip's VMEM (v4: 16 MiB; v5e, v6e: 128 MiB)."""
    import re

    from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
    # x resident for 512 rows x K = 8192 (16 MiB double-buffered), in 32 one-chunk K steps: a 18.5 MiB estimate
    big = (BlockConfig(block_m=512, block_n=512, block_k=256, x_resident=True), (512, 8192), 512, None)
    small = (None, (16, 4096), 4096, 128)
    for kind, capacity in (("TPU v4", 16 << 20), ("TPU v5 lite", 128 << 20), ("TPU v6 lite", 128 << 20)):
        for config, x_shape, n, group in (small, big):
            avals = _avals("nf4", group, True, x_shape, n, jnp.bfloat16)
            prob = make_problem("nf4", group, True, m=x_shape[0], k=x_shape[1], n=n)
            plan = mosaic_tpu.plan(prob, api.resolve("mosaic_tpu", prob, config))
            estimate = mosaic_tpu.vmem_bytes(prob, plan, False)
            f = lambda x, q: quantized_matmul(x, q, implementation="mosaic_tpu", config=config)  # noqa: E731
            with on_tpu(kind):
                text = jax.jit(f).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
            (size,) = map(int, re.findall(r"\\22size\\22: (\d+)", text))
            assert size == int(min(0.9 * capacity, max(32 << 20, 2 * estimate))), (kind, x_shape)
        assert size >= int(min(2 * estimate, 0.9 * capacity)) and estimate > 16 << 20  # the big tiling: its VMEM
    assert mosaic_tpu.vmem_limit(make_problem(), mosaic_tpu.plan(make_problem(), api.resolve(
        "mosaic_tpu", make_problem(), None)), False) is None  # interpret mode on CPU: no chip, no limit


def test_mosaic_tpu_lookup_declines_cleanly_without_a_lane_gather(monkeypatch):
    """lookup=True needs Mosaic's lane gather (tpu.dynamic_gather): probed once by lowering; where the lowering
    has none, the kernel declines with the reason and the fix instead of failing inside the compiler."""
    from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
    mosaic_tpu.lane_gather_missing.cache_clear()
    assert mosaic_tpu.lane_gather_missing() is None  # this jax lowers it
    x, qt = jax.ShapeDtypeStruct((16, 1024), jnp.bfloat16), abstract_weight("nf4", 128, True, 1024, 256)

    def no_gather(*a, **k):
        raise NotImplementedError("Unsupported gather")

    monkeypatch.setattr(mosaic_tpu, "_lane_lookup", no_gather)
    mosaic_tpu.lane_gather_missing.cache_clear()
    try:
        why = why_not("mosaic_tpu", x, qt, BlockConfig(lookup=True))
        assert "cannot lower the lane gather (Unsupported gather)" in why and "lookup=False" in why
        assert why_not("mosaic_tpu", x, qt) is None  # the default (select tree) is unaffected
    finally:
        mosaic_tpu.lane_gather_missing.cache_clear()


def test_mosaic_tpu_chunks_fit_the_vreg_file():
    """Each chunk's f32 temporaries are at most 16 of the 64 vregs (128 slot rows x 128 lanes), whatever the
    tile width; the numerics tests run tiles of several column blocks."""
    from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
    for fmt, g, m in (("nf4", 128, 1), ("int4", 128, 16), ("nf3", 128, 64), ("int2", None, 256)):
        prob = make_problem(fmt, g, True, m=m, k=4096, n=4096)
        plan = mosaic_tpu.plan(prob, api.resolve("mosaic_tpu", prob, None))
        assert plan.cr * plan.cn * 4 <= mosaic_tpu.CHUNK_TEMP_BYTES and plan.bn % plan.cn == 0, (fmt, plan)
        assert plan.bn // plan.cn >= 2  # the default 512-wide tile is several blocks
    prob = Problem.create(*SHAPES["mosaic_tpu"][0][3:4], jnp.bfloat16, abstract_weight("nf4", 128, True, 4096, 256))
    assert mosaic_tpu.plan(prob, api.resolve("mosaic_tpu", prob, None)).cn == 128  # a numerics case: 2 blocks


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("fmt", ["nf4", "nf3", "fp4_e2m1"])
def test_mosaic_tpu_lane_lookup_lowers(kind, fmt):
    f = lambda x, q: quantized_matmul(x, q, implementation="mosaic_tpu", config=BlockConfig(lookup=True))  # noqa
    avals = _avals(fmt, 128, True, (16, 4096), 1024, jnp.bfloat16)  # outside the mesh (they are cached)
    with on_tpu(kind):
        text = jax.jit(f).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    # x and the table's broadcast (the last operand)
    assert input_fusion_flags(text) == ["true"] + ["false"] * (custom_call_operands(text) - 2) + ["true"]


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3][0]}-{jnp.dtype(c[5]).name}")
def test_triton_lowers(case, verified_triton_modules):
    text = _lower("triton", _avals(*case), "cuda")
    assert "xla.gpu.triton" in text
    assert len(verified_triton_modules) == 1


@pytest.mark.parametrize("fmt,m", [("int4", 1), ("nf4", 4), ("nf3", 2)])
def test_triton_gemv_lowers(fmt, m, verified_triton_modules):
    """The GEMV variant: a Triton module with no tl.dot (products summed over K) and evict-first code loads."""
    f = lambda x, q: quantized_matmul(x, q, implementation="triton", config=BlockConfig(block_m=m))  # noqa: E731
    text = jax.jit(f).trace(*_avals(fmt, 128, True, (m, 4096), 4096, jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and len(verified_triton_modules) == 1
    ir = str(verified_triton_modules[0].module)
    assert "tt.dot" not in ir and "tt.reduce" in ir and "evict_first" in ir
    # its products and sums are vector work the roofline counts (a dot's are not): one multiply per weight per row
    ops = roofline.kernel_ops(jax.make_jaxpr(f)(*_avals(fmt, 128, True, (m, 4096), 4096, jnp.bfloat16)))
    assert ops.by_primitive["mul"] >= m


def test_triton_atomic_split_k_lowers(verified_triton_modules):
    """Decode with split-K partials added atomically: one float32 output aliased into the kernel, no XLA sum."""
    f = lambda x, q: quantized_matmul(x, q, implementation="triton", config=BlockConfig(split_k_atomic=True))  # noqa
    avals = _avals("nf4", 128, True, (1, 4096), 4096, jnp.bfloat16)
    text = jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "tt.atomic_rmw" in str(verified_triton_modules[0].module)
    outer = {e.primitive.name for e in eqns_around_kernels(jax.make_jaxpr(f)(*avals).jaxpr)}
    assert "reduce_sum" not in outer


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
    assert ops.weighted == 8 + 1 + 2 + 2 + 2  # convert 8, float sub and muls 1 each, compare and select 2 each

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


@pytest.mark.parametrize("bits,asym", [(4, True), (4, False), (3, True), (2, False), (8, True)])
def test_int_decode_without_a_convert_is_bit_identical(bits, asym):
    """INT levels by the 2^23 bit trick (OR the code into 2^23's mantissa, subtract 2^23 + zero) equal
    ``(float(code) - zero) * scale`` bit for bit, for every code and zero point."""
    from afpq_jax._src.kernels.quantized_matmul import decode
    prob = make_problem(f"int{bits}", 128, asym, m=1, k=256, n=256)
    n = 2**bits
    code = jnp.asarray(np.arange(n * n * 4, dtype=np.int32) % n).reshape(-1, 64)
    zero = jnp.asarray(np.arange(code.size, dtype=np.int32) // (n * 4) % n, jnp.float32).reshape(code.shape)
    scale = jnp.asarray(np.random.default_rng(bits).standard_normal(code.shape) * 1e-2, jnp.float32)
    sc = decode.prepare_scales(prob, scale, None, zero if asym else None)
    got = np.asarray(jax.jit(lambda c, sc: decode.dequant(prob, c, sc))(code, sc))
    want = (np.asarray(code, np.float32) - (np.asarray(zero) if asym else np.float32(n // 2))) * np.asarray(scale)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    if bits == 4:  # and no int -> float convert per weight in the Triton kernel: what converts remain are the
        # byte plane's widening (0.5 per weight), the cast to x's dtype (1) and the scale rows' (1/64 per weight)
        avals = _avals("int4", 128, asym, (1, 4096), 4096, jnp.bfloat16)
        ops = roofline.kernel_ops(jax.make_jaxpr(lambda x, q: quantized_matmul(x, q, implementation="triton"))(*avals))
        assert ops.by_primitive["convert_element_type"] < 1.6 and ops.by_primitive["bitcast_convert_type"] == 1.0


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
            outer = {e.primitive.name for e in eqns_around_kernels(jaxpr.jaxpr)}
            assert "pallas_call" in outer and not {"pad", "transpose"} & outer, outer


def test_triton_decode_fills_an_h100():
    """Decode (M <= 16) at K = N = 4096: at least 2 programs per SM of a 132-SM H100 (64 output tiles alone before
    split-K by CTA count), each looping over >= 4 K tiles, with shared memory for 2 programs per SM."""
    from afpq_jax._src.kernels.quantized_matmul import triton
    for fmt in ("int4", "fp4_e2m1", "nf4", "nf3"):
        for m in range(1, 17):
            prob = make_problem(fmt, 128, True, m=m, k=4096, n=4096)
            cfg = api.resolve("triton", prob, None)
            split, per_split = triton.effective_split(prob, cfg)
            launch = IMPLEMENTATIONS["triton"].launch(prob, cfg)
            assert launch["programs"] == -(-4096 // cfg.block_n) * -(-m // cfg.block_m) * split
            assert launch["programs"] >= 2 * 132 and per_split >= 4, (fmt, m, cfg)
            assert 2 * launch["smem_bytes"] <= 228 * 1024
            assert why_not("triton", jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16),
                           abstract_weight(fmt, 128, True, 4096, 4096), cfg) is None
    prob = make_problem("nf4", 128, True, m=64, k=4096, n=4096)  # prefill keeps whole-K programs
    assert triton.effective_split(prob, api.resolve("triton", prob, None))[0] == 1


# ---------------------------------------------------------------------------------------------------------
# Dispatch.

@pytest.mark.parametrize("impl", KERNELS)
def test_vmap_over_stacked_weights(impl):
    w = jax.random.normal(jax.random.key(0), (2, 512, 128), jnp.float32)
    qt = afpq_jax.quantize(w, "nf4", group_size=256, asym=True)
    x = make_x((2, 3, 512), jnp.bfloat16)
    y = jax.jit(jax.vmap(lambda x, q: quantized_matmul(x, q, implementation=impl, interpret=INTERPRET)))(x, qt)
    ref = quantized_matmul(x, qt)  # xla, batched matmul
    for b in range(2):
        check_against_reference(y[b], x[b], jax.tree.map(lambda a: a[b], qt), ref[b])


@pytest.mark.parametrize("impl", ["cpu", *KERNELS])
def test_kernels_differentiate_like_xla(impl):
    """Pallas and FFI kernels have no derivative rules of their own; they take the "xla" path's. With a loss
    linear in the output the cotangent is the same for every implementation, so the gradients (x and the float
    scales) and the JVP equal xla's exactly. Dispatch (implementation=None) picks the C++ kernel at M = 4 on CPU,
    which raised "cannot be differentiated" before."""
    k, n, dt = (1024, 128, jnp.bfloat16) if impl == "mosaic_gpu" else (256, 128, jnp.float32)
    if impl == "cpu" and IMPLEMENTATIONS["cpu"].supports(make_problem("nf4", 64, m=4, k=k, n=n, dtype=dt), BlockConfig()):
        pytest.skip("the C++ kernel cannot be built here")
    qt = make_weight("nf4", 64 if impl != "mosaic_gpu" else 256, True, k, n)
    x = make_x((4, k), dt)
    c = make_x((4, n), dt, seed=2)

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
            prob = make_problem(fmt, g, True, m=m, k=4096, n=4096)
            got = roofline.kernel_hbm_bytes("mosaic_tpu", prob, api.resolve("mosaic_tpu", prob, None))
            assert got["total"] - got["x_prep"] <= 1.01 * roofline.ideal_bytes(prob), (fmt, g, m, got)
            assert got["x_prep"] <= 2 * m * 4096 * 2 * 1.01  # the XLA permutation pass: read x, write a copy
    # Triton decode: split-K for parallelism, partial sums bounded; weights and scales once, no M padding.
    cfg = api.resolve("triton", make_problem("nf4", 128, True, m=1, k=4096, n=4096), None)
    assert cfg.split_k > 1 and api.resolve("triton", make_problem(m=512, k=4096, n=4096), None).split_k == 1
    prob = make_problem("nf4", 128, True, m=1, k=4096, n=4096)
    got = roofline.kernel_hbm_bytes("triton", prob, api.resolve("triton", prob, None))
    assert got["codes"] + got["scales"] == pytest.approx(roofline.ideal_bytes(prob) - 2 * (4096 + 4096))
    assert got["x_prep"] == 0 and got["x"] == 2 * 4096  # x read as it is, once from HBM
