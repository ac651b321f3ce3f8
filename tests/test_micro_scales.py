"""Micro-scaled scale formats (`QuantScheme.scale_dtype` float8_e4m3fn under a global scale: NVFP4's;
float8_e8m0fnu: OCP MX's powers of two) against the numpy reference written from the specs (`tests.reference`),
the presets, and every consumer of the scales: dequantize, fake quant, GPTQ, the clipping search, kernels,
checkpoints."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.algorithms.clip import clip_search
from afpq_jax._src.algorithms.gptq import gptq_quantize
from afpq_jax._src.errors import InputError
from afpq_jax.kernels import quantized_matmul
from tests import reference as ref
from tests.support import cli_error

MICRO = ("float8_e4m3fn", "float8_e8m0fnu")


def _weights(k, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * np.exp(rng.uniform(-3, 3, (1, n)))  # columns over 2.6 decades
    w[:, 0] = np.abs(w[:, 0])  # one-signed: the negative side has no values
    w[:, 1] = 0.0  # an all-zero column
    w[: k // 2, 2] *= 1e-6  # groups far below the tensor's range: E4M3 subnormal / underflowing scales
    return w.astype(np.float32)


@pytest.mark.parametrize("scale_dtype", MICRO)
@pytest.mark.parametrize("fmt,asym", [("fp4_e2m1", True), ("fp4_e2m1", False), ("nf4", True), ("int4", True),
                                      ("int4", False)])
def test_codes_and_scales_equal_the_numpy_reference(fmt, asym, scale_dtype):
    g = 16 if scale_dtype == "float8_e4m3fn" else 32
    w = _weights(96, 24, seed=zlib.crc32(f"{fmt}{asym}{scale_dtype}".encode()))
    qt = aq.quantize(w, fmt, group_size=g, asym=asym, scale_dtype=scale_dtype)
    qt.validate()
    assert qt.scale.dtype == jnp.dtype(scale_dtype)
    got = np.asarray(aq.dequantize(qt), np.float64)
    want, side_scale, near_tie = ref.ref_quantize(w, fmt, g, asym, scale_dtype)
    mismatch = got != want
    assert np.all(near_tie[mismatch]) and mismatch.mean() < 0.01, f"{mismatch.sum()} mismatches"
    if scale_dtype == "float8_e4m3fn":
        assert qt.global_scale.shape == (1,)
        assert qt.global_scale[0] == ref.ref_global_scale(w, fmt, asym, g)
        sides = [np.asarray(s, np.float32) for s in (qt.scale, qt.scale_neg) if s is not None]
        assert max(float(s.max()) for s in sides) == 448.0  # the largest group (either side) spans E4M3's range
    else:
        assert qt.global_scale is None
        e = np.asarray(qt.scale).view(np.uint8).astype(int) - 127  # E8M0: the biased exponent byte
        np.testing.assert_array_equal(np.exp2(e), np.asarray(qt.float_scales()[0]))


def test_a_shared_global_scale_is_the_smallest_and_every_path_takes_it():
    """Layers a server fuses (q/k/v, gate/up) share one E4M3 global scale: the column concatenation's, i.e. the
    smallest of their own. `quantize`, GPTQ and the clip search take it in place of the weight's own."""
    ws = [_weights(64, n, seed) * scale for n, seed, scale in ((24, 1, 1.0), (8, 2, 3.0), (8, 3, 0.5))]
    scheme = QuantScheme.preset("nvfp4", asym=True)
    shared = scheme.global_scale(ws)
    assert float(shared) == min(ref.ref_global_scale(w, "fp4_e2m1", True, 16) for w in ws)
    assert float(shared) == ref.ref_global_scale(np.concatenate(ws, axis=1), "fp4_e2m1", True, 16)
    for w in ws:
        qt = scheme.quantize(w, global_scale=shared)
        assert qt.global_scale[0] == shared
        want, _, near_tie = ref.ref_quantize(w, "fp4_e2m1", 16, True, "float8_e4m3fn", global_scale=shared)
        mismatch = np.asarray(aq.dequantize(qt), np.float64) != want
        assert np.all(near_tie[mismatch]) and mismatch.mean() < 0.01
        h = jnp.asarray(np.diag(np.random.default_rng(0).uniform(0.5, 2, 64)), jnp.float32)
        gq = gptq_quantize(jnp.asarray(w), h, "fp4_e2m1", group_size=16, scale_dtype="float8_e4m3fn", damp=0.0,
                           global_scale=shared)  # diagonal Hessian: RTN, here under the shared scale
        np.testing.assert_array_equal(np.asarray(gq.scale).view(np.uint8), np.asarray(qt.scale).view(np.uint8))
        x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
        ratios, _ = clip_search(w, x, "fp4_e2m1", group_size=16, scale_dtype="float8_e4m3fn", global_scale=shared)
        clipped = scheme.quantize(w, ratios, shared)
        out = lambda q: float(np.mean((x @ (np.asarray(aq.dequantize(q)) - w)) ** 2))  # noqa: E731
        assert out(clipped) <= out(qt) * (1 + 1e-6)
    assert QuantScheme.preset("mxfp4").global_scale(ws) is None
    with pytest.raises(aq.InputError, match="float8_e4m3fn group scales only"):
        aq.quantize(ws[0], "fp4_e2m1", group_size=32, scale_dtype="float8_e8m0fnu", global_scale=1.0)
    with pytest.raises(aq.InputError, match="positive and finite"):
        scheme.quantize(ws[0], global_scale=-1.0)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_fused_projections_share_their_global_scale_under_every_method(method):
    from tests.support import FIXTURES
    cal = aq.Calibration(random=True, samples=4, seqlen=16, batch_size=4, search_batch_size=4)
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", QuantScheme.preset("nvfp4", asym=True), method=method,
                                   calibration=None if method == "rtn" else cal, progress=False)
    for block in model.layers:
        g = {name: float(np.asarray(layer.global_scale.get_value())[0]) for name, layer in
             (("q", block.attn.q_proj), ("k", block.attn.k_proj), ("v", block.attn.v_proj),
              ("gate", block.mlp.gate_proj), ("up", block.mlp.up_proj), ("o", block.attn.o_proj))}
        assert g["q"] == g["k"] == g["v"] and g["gate"] == g["up"]
        # the shared scale is set by the largest range, so it is not above the members' own
        kernel = lambda layer: np.asarray(layer.weight())  # noqa: E731
        assert g["q"] <= ref.ref_global_scale(kernel(block.attn.q_proj), "fp4_e2m1", True, 16) * 1.001


def test_e8m0_is_the_ocp_shared_exponent_at_every_power_of_two_boundary():
    # ranges at, just under and just over powers of two, from the smallest exponent to the largest
    exps = np.arange(-120, 120, 7)
    r = np.concatenate([np.exp2(exps), np.nextafter(np.exp2(exps), 0), np.nextafter(np.exp2(exps), np.inf)])
    r = r.astype(np.float32)
    w = np.zeros((32, r.size), np.float32)
    w[0] = r  # one value per column: the group's range
    qt = aq.quantize(w, "fp4_e2m1", group_size=32, asym=False, scale_dtype="float8_e8m0fnu")
    got = np.asarray(qt.float_scales()[0])[0]
    want = np.exp2(np.floor(np.log2(r.astype(np.float64))) - 2)  # emax of E2M1 is 2 (6 = 1.5 x 2^2)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # 4x the scale is the top power of two of the range: values up to 8x the scale would be needed, 6x is kept
    dq = np.asarray(aq.dequantize(qt))[0]
    np.testing.assert_array_equal(dq, np.minimum(np.asarray(ref.ref_quantize(w, "fp4_e2m1", 32, False,
                                                                          "float8_e8m0fnu")[0])[0], 6 * got))


def test_e4m3_rounds_to_nearest_and_saturates_like_ml_dtypes():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 4000)).astype(np.float32) * np.exp(rng.uniform(-14, 0, 4000)).astype(np.float32)
    w[0, 0] = 10.0  # the tensor's range: group scales of every magnitude below it, subnormal E4M3 included
    qt = aq.quantize(w, "fp4_e2m1", group_size=16, asym=False, scale_dtype="float8_e4m3fn")
    gs = np.float32(2688.0) / np.float32(10.0)
    assert qt.global_scale[0] == gs  # NVFP4's 448 * 6 / amax
    ideal = (np.max(np.abs(w), axis=0) * ref.recip_up(6.0)).astype(np.float32) * gs
    want = np.minimum(ideal, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(qt.scale)[0].view(np.uint8), want.view(np.uint8))
    assert np.any(np.abs(want.astype(np.float32)) < 2.0**-6)  # subnormal E4M3 scales were exercised


@pytest.mark.parametrize("name,asym,bits", [("nvfp4", False, 4.5), ("nvfp4", True, 5.0), ("mxfp4", False, 4.25),
                                            ("mxfp4", True, 4.5)])
def test_presets_and_their_bits_per_weight(name, asym, bits):
    scheme = QuantScheme.preset(name, asym=asym)
    assert scheme.format == "fp4_e2m1" and scheme.asym == asym
    assert QuantScheme.from_json(scheme.to_json()) == scheme
    qt = scheme.quantize(_weights(256, 64, 0))
    global_bits = 0 if qt.global_scale is None else 32 / (256 * 64)
    assert qt.bits_per_weight == pytest.approx(bits + global_bits)


def test_bad_combinations_are_refused():
    with pytest.raises(InputError, match="integer group scales need"):
        QuantScheme.create("int4", scale_dtype="float8_e4m3fn", integer_scales=True)
    with pytest.raises(InputError, match="presets"):
        QuantScheme.preset("nvfp8")
    qt = aq.quantize(_weights(32, 8, 1), "fp4_e2m1", group_size=16, scale_dtype="float8_e4m3fn")
    import dataclasses
    with pytest.raises(InputError, match="global_scale must be present"):
        dataclasses.replace(qt, global_scale=None).validate()
    with pytest.raises(InputError, match="global_scale has zero"):
        dataclasses.replace(qt, global_scale=jnp.zeros((1,), jnp.float32)).validate()


def test_convert_presets_fix_group_size_and_scale_dtype(capsys, tmp_path):
    for extra in (["--group-size", "128"], ["--scale-dtype", "float16"]):
        err = cli_error(capsys, ["--format", "nvfp4", *extra, "--out", str(tmp_path / "x")])
        assert "fixes groups of 16 and float8_e4m3fn scales" in err and extra[0] in err


@pytest.mark.parametrize("scale_dtype", MICRO)
def test_fake_quant_gptq_and_clip_search_honour_the_scale_format(scale_dtype):
    g = 16 if scale_dtype == "float8_e4m3fn" else 32
    w = _weights(128, 40, 5)
    rtn = aq.quantize(w, "fp4_e2m1", group_size=g, asym=True, scale_dtype=scale_dtype)
    np.testing.assert_array_equal(np.asarray(aq.fake_quant(w, "fp4_e2m1", group_size=g, scale_dtype=scale_dtype)),
                                  np.asarray(aq.dequantize(rtn)))
    # GPTQ with a diagonal Hessian and no damping has no error to feed back: it is RTN, scales and all
    h = jnp.asarray(np.diag(np.random.default_rng(0).uniform(0.5, 2, 128)), jnp.float32)
    gq = gptq_quantize(jnp.asarray(w), h, "fp4_e2m1", group_size=g, scale_dtype=scale_dtype, damp=0.0)
    for field in ("codes", "scale", "scale_neg", "global_scale"):
        a, b = getattr(gq, field), getattr(rtn, field)
        assert (a is None) == (b is None), field
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), err_msg=field)
    # the clipping search's result quantizes to no more output error than no clipping, in the same format
    x = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    ratios, err = clip_search(w, x, "fp4_e2m1", group_size=g, scale_dtype=scale_dtype)
    clipped = aq.quantize(w, "fp4_e2m1", group_size=g, scale_dtype=scale_dtype, clip_ratios=ratios)
    out = lambda q: float(np.mean((x @ (np.asarray(aq.dequantize(q)) - w)) ** 2))  # noqa: E731
    assert out(clipped) <= out(rtn) * (1 + 1e-6)


@pytest.mark.parametrize("impl", ["xla", "xla_scan", "triton"])
def test_kernels_take_micro_scaled_weights(impl):
    w = _weights(256, 64, 2)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 256)), jnp.float32)
    for name in ("nvfp4", "mxfp4"):
        qt = QuantScheme.preset(name, asym=True).quantize(w)
        want = np.asarray(x) @ np.asarray(aq.dequantize(qt))
        got = quantized_matmul(x, qt, implementation=impl, interpret=True)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))


def test_a_micro_scaled_checkpoint_loads_with_identical_logits(tmp_path):
    from tests.support import FIXTURES
    rules = [aq.QuantRule(r".*mlp.*", QuantScheme.preset("nvfp4", asym=True)),
             aq.QuantRule(r".*", QuantScheme.preset("mxfp4"))]
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", rules, method=aq.RTN(), progress=False)
    aq.save(model, tmp_path / "ckpt")
    again = aq.load(tmp_path / "ckpt")
    ids = jnp.asarray(np.arange(12, dtype=np.int32)[None])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))
    up = again.layers[0].mlp.up_proj.quantized_tensor()
    assert up.scale.dtype == jnp.float8_e4m3fn and up.global_scale is not None
    assert again.layers[0].attn.q_proj.quantized_tensor().scale.dtype == jnp.float8_e8m0fnu
