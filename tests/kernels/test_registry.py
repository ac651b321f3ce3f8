"""Kernel dispatch: implementation order per backend, size rules, declines and fallbacks, custom implementations,
default and measured tilings."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax
from afpq_jax._src import quantizer
from afpq_jax._src.kernels.quantized_matmul import api, cpu
from afpq_jax._src.kernels.quantized_matmul.base import Problem
from afpq_jax.kernels import IMPLEMENTATIONS, BlockConfig, quantized_matmul, select_implementation, why_not
from tests.kernels.support import (FORMATS, KERNELS, abstract_weight, check_against_reference, eqns_around_kernels, make_problem, run_impl,
                                   make_weight, make_x)


# ---------------------------------------------------------------------------------------------------------
# Dispatch.

def test_cpu_dispatch_by_size_and_dtype():
    qt = make_weight("nf4", 128, True, 576, 200)

    def pick(m, dtype=jnp.float32):
        return select_implementation(Problem.create((m, 576), dtype, qt), backend="cpu")[0]

    if cpu.isa() is None:
        pytest.skip(f"no C++ CPU kernel here: {cpu.why_unsupported(Problem.create((1, 576), jnp.float32, qt))}")
    limit = cpu.MAX_M[cpu.isa()]["codebook"]  # the rule of the path this machine built
    if limit:
        assert pick(1) == pick(limit) == "cpu"
        assert pick(1, jnp.bfloat16) == "cpu"
    assert pick(limit + 1) == "xla"  # the C++ kernel's size rule
    assert pick(1, jnp.float16) == "xla"  # the C++ kernel takes float32 or bfloat16 x
    x = make_x((2, 576), jnp.float32)
    ref = quantizer.dequantize(qt, jnp.float32)
    np.testing.assert_allclose(np.asarray(quantized_matmul(x, qt)), np.asarray(x) @ np.asarray(ref),
                               rtol=1e-5, atol=1e-4)
    # size rules are dispatch preferences: a named implementation runs any M
    check_against_reference(quantized_matmul(make_x((70, 576), jnp.float32), qt, implementation="cpu"), make_x((70, 576), jnp.float32), qt)


def test_cpu_size_rule_per_path_and_format_kind(monkeypatch):
    """Measured per path (BUILD_NOTES, "CPU path per ISA"): AVX-512 / AVX2 up to M = 256 for every format; the
    portable loop INT up to M = 16 and never for a code book (its lookup loses to dequantize + dot)."""
    int4, nf4 = make_weight("int4", 128, True, 576, 200), make_weight("nf4", 128, True, 576, 200)

    def rule(path, qt, m):
        monkeypatch.setattr(cpu, "isa", lambda: path)
        return cpu.why_not_preferred(Problem.create((m, 576), jnp.float32, qt))

    for path in ("avx512", "avx2", "neon"):
        assert rule(path, int4, 256) is None and rule(path, nf4, 256) is None
        assert "M=257 > 256 on the %s path" % path in rule(path, nf4, 257)
    assert rule("portable", int4, 16) is None and "M=17 > 16" in rule("portable", int4, 17)
    assert "code-book lookup is slower" in rule("portable", nf4, 1)


def test_dispatch_order_per_backend():
    assert api.DISPATCH_ORDER == {"tpu": ("mosaic_tpu", "xla"), "gpu": ("triton", "mosaic_gpu", "xla"),
                                  "cpu": ("cpu", "xla")}
    assert select_implementation(make_problem(), backend="tpu")[0] == "mosaic_tpu"
    assert select_implementation(make_problem(), backend="gpu")[0] == "triton"
    assert select_implementation(make_problem(dtype=jnp.float32), backend="cpu")[0] == "cpu"
    assert select_implementation(make_problem(), backend="something-else")[0] == "xla"


def test_gpu_dispatch_by_size(caplog):
    # Prefill (M >= 128 rows after flattening): dequantize once and the library GEMM, measured faster on an H200;
    # no fallback warning (a preference, not a decline). A named kernel still runs any M.
    api.REGISTRY.log_declines_again()
    with caplog.at_level(logging.WARNING, logger="afpq_jax.kernels"):
        for m, x_shape in ((1, (1, 1024)), (127, (127, 1024)), (128, (128, 1024)), (2048, (4, 512, 1024))):
            prob = Problem.create(x_shape, jnp.bfloat16, abstract_weight("nf4", 128, True, 1024, 256))
            assert prob.m == m
            assert select_implementation(prob, backend="gpu")[0] == ("triton" if m < 128 else "xla"), m
    # Mosaic GPU (next in line, and it takes NF4 g128 bf16) has the same rule, or it would win at M = 128 above.
    assert IMPLEMENTATIONS["mosaic_gpu"].preferred(make_problem(m=127)) is None
    assert "M=128" in IMPLEMENTATIONS["mosaic_gpu"].preferred(make_problem(m=128))
    assert "declined" not in caplog.text
    qt = make_weight("int4", 128, True, 256, 64)
    x = make_x((130, 256), jnp.float32)
    check_against_reference(run_impl("triton", x, qt), x, qt)


def test_fallback_logs_once(caplog):
    api.REGISTRY.log_declines_again()
    prob = make_problem("nf3", 32, True)  # 3-bit groups of 32: declined by Mosaic TPU
    with caplog.at_level(logging.INFO, logger="afpq_jax.kernels"):
        assert select_implementation(prob, backend="tpu")[0] == "xla"
        assert select_implementation(prob, backend="tpu")[0] == "xla"
    recs = [r for r in caplog.records if r.name == "afpq_jax.kernels"]
    assert len(recs) == 1 and "mosaic_tpu declined" in recs[0].getMessage() and "using xla" in recs[0].getMessage()


def test_gpu_fallback_chain(caplog):
    api.REGISTRY.log_declines_again()
    # Group of 96 rows: not a power of two (Triton) and not a WGMMA-sized group (Mosaic GPU) -> xla.
    prob = make_problem("int4", 96, True, k=960)
    with caplog.at_level(logging.INFO, logger="afpq_jax.kernels"):
        assert select_implementation(prob, backend="gpu")[0] == "xla"
    msgs = [r.getMessage() for r in caplog.records if r.name == "afpq_jax.kernels"]
    assert len(msgs) == 2 and "triton declined" in msgs[0] and "using mosaic_gpu" in msgs[0]
    assert "mosaic_gpu declined" in msgs[1] and "using xla" in msgs[1]
    # f32 x: Triton takes it; Mosaic GPU would decline (no exact f32 WGMMA).
    assert select_implementation(make_problem(dtype=jnp.float32), backend="gpu")[0] == "triton"
    assert "float32" in IMPLEMENTATIONS["mosaic_gpu"].supports(make_problem(dtype=jnp.float32),
                                                               api.resolve("mosaic_gpu", make_problem(dtype=jnp.float32),
                                                                            None))


def test_stacked_weights_fall_back():
    w = jax.random.normal(jax.random.key(0), (2, 256, 128), jnp.float32)
    qt = afpq_jax.quantize(w, "int4", group_size=128, asym=True)
    x = make_x((2, 5, 256), jnp.float32)
    for impl in KERNELS:
        assert "stacked" in why_not(impl, x, qt)
    y = quantized_matmul(x, qt)  # CPU: xla, batched matmul semantics
    ref = jnp.einsum("bmk,bkn->bmn", x, quantizer.dequantize(qt), precision="highest")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
    with pytest.raises(NotImplementedError, match="stacked"):
        quantized_matmul(x, qt, implementation="triton", interpret=True)


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
    qt = make_weight("int4", 128, True, 256, 128)
    x = make_x((2, 256), jnp.float32)
    with pytest.raises(afpq_jax.InputError, match="unknown implementation"):
        why_not("cuda", x, qt)
    np.testing.assert_array_equal(quantized_matmul(np.asarray(x), qt), quantized_matmul(x, qt))


@pytest.mark.parametrize("impl,fmt,group", [("mosaic_tpu", "nf3", 32), ("mosaic_tpu", "int4", 96),
                                            ("triton", "int4", 96), ("mosaic_gpu", "int4", 96),
                                            ("mosaic_gpu", "nf3", 128), ("mosaic_gpu", "int3", 512)])
def test_documented_declines(impl, fmt, group):
    qt = make_weight(fmt, group, True, 1152, 128)
    x = make_x((2, 1152), jnp.bfloat16)
    assert why_not(impl, x, qt) is not None
    with pytest.raises(NotImplementedError, match=impl):
        quantized_matmul(x, qt, implementation=impl, interpret=True)


def test_mosaic_tpu_lookup_needs_lane_aligned_tiles():
    qt = make_weight("nf4", 128, True, 256, 130)  # N = 130: one full-width, not lane-aligned block
    x = make_x((2, 256), jnp.float32)
    assert "multiple of 128" in why_not("mosaic_tpu", x, qt, BlockConfig(lookup=True))
    assert why_not("mosaic_tpu", x, qt) is None  # the default decode takes it


def test_bad_arguments():
    qt = make_weight("int4", 128, True, 256, 128)
    with pytest.raises(ValueError, match="unknown implementation"):
        quantized_matmul(make_x((1, 256), jnp.float32), qt, implementation="cuda_magic")
    with pytest.raises(TypeError, match="float"):
        quantized_matmul(jnp.ones((1, 256), jnp.int32), qt)
    with pytest.raises(ValueError, match="in_features"):
        quantized_matmul(make_x((1, 255), jnp.float32), qt)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        quantized_matmul(make_x((1, 256), jnp.float32), jnp.ones((256, 128)))
    with pytest.raises(NotImplementedError, match="block_n"):
        quantized_matmul(make_x((1, 256), jnp.float32), qt, implementation="mosaic_tpu",
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
        qt = make_weight("int4", 128, True, 256, 128)
        x = make_x((3, 256), jnp.float32)
        np.testing.assert_allclose(np.asarray(quantized_matmul(x, qt, implementation="test_doubling")),
                                   2 * np.asarray(quantized_matmul(x, qt)), rtol=1e-6)
    finally:
        del api.IMPLEMENTATIONS["test_doubling"]


def test_config_resolve_keeps_overrides():
    prob = make_problem()
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
                    p = make_problem(fmt, g, True, m=m, k=4096, n=4096, dtype=dt)
                    assert IMPLEMENTATIONS[impl].supports(p, api.resolve(impl, p, None)) is None, (impl, fmt, g, m)


def dataclasses_FrozenInstanceError():
    import dataclasses
    return dataclasses.FrozenInstanceError


# ---------------------------------------------------------------------------------------------------------
# Measured tilings (`tuning`): the table, dispatch's use of it, the autotuning script.

def _scan_chunks(impl, x, qt, config=None):
    jaxpr = jax.make_jaxpr(lambda a, q: quantized_matmul(a, q, implementation=impl, config=config))(x, qt)
    return [e.params["length"] for e in eqns_around_kernels(jaxpr.jaxpr) if e.primitive.name == "scan"]


def test_tuned_tiling_is_used_under_the_callers_fields_and_dropped_when_declined(tmp_path, monkeypatch):
    from afpq_jax.kernels import tuning
    monkeypatch.setenv("AFPQ_TUNED_CONFIGS", str(tmp_path / "table.json"))
    qt = make_weight("nf4", 128, True, 1024, 256)
    x = make_x((3, 1024), jnp.float32)
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
    check_against_reference(quantized_matmul(x, qt, implementation="xla_scan"), x, qt)
    # An entry the kernel declines (Triton needs power-of-two tiles) is dropped: the defaults apply.
    tuning.record({tuning.shape_key("triton", prob, kind): BlockConfig(block_n=24)})
    assert api.resolve_tuned("triton", prob, None) == api.resolve("triton", prob, None)
    (tmp_path / "table.json").write_text("{not json")
    with pytest.raises(afpq_jax.InputError, match="not valid JSON"):
        tuning.load()
