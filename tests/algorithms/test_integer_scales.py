"""Integer group scales (QServe's progressive group quantization): against numpy, int8 weights, one int8 GEMM, GPTQ,
checkpoints."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax._src import packing
from afpq_jax._src.errors import InputError
from afpq_jax.algorithms import gptq_quantize
from afpq_jax.kernels import quantized_matmul, quantized_matmul_a8
from tests import reference as ref
from tests.support import FIXTURES, random_calibration, emulated_int8_matmul

FORMATS = [("int4", True), ("int4", False), ("fp4_e2m1", True), ("fp4_e2m1", False), ("fp3_e2m0", True),
           ("int3", True), ("int2", True)]


def _weight(seed: int, k: int = 100, n: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] *= 40.0  # a column with a much larger range than its neighbours
    w[5:9, 7] = 0.0
    w[:, 11] = np.abs(w[:, 11])  # a column without negative values: s_neg = 0
    w[:, 12] = 0.0  # an all-zero column: channel scale 0
    return w


@pytest.mark.parametrize("fmt,asym,group_size", [(f, a, 48) for f, a in FORMATS]  # 48: K=100, a short last group
                         + [(f, True, g) for f in ("int4", "fp4_e2m1") for g in (32, None)])
def test_integer_scales_equal_the_numpy_reference(fmt, asym, group_size):
    w = _weight(hash((fmt, asym, group_size)) % 2**32)
    qt = aq.quantize(w, fmt, group_size=group_size, asym=asym, integer_scales=True)
    qt.validate()
    want, ints, channel = ref.ref_quantize_integer_scales(w, fmt, group_size, asym)
    np.testing.assert_array_equal(np.asarray(qt.channel_scale, np.float32), channel)
    got_ints = {"pos": np.asarray(qt.scale), "neg": None if qt.scale_neg is None else np.asarray(qt.scale_neg)}
    # floor/ceil error comparisons in float32 vs float64 may differ on near-ties: allow a few groups
    agree = got_ints["pos"] == ints["pos"]
    assert agree.mean() > 0.97, (agree.mean(), got_ints["pos"][~agree], ints["pos"][~agree])
    dq = np.asarray(aq.dequantize(qt, jnp.float32), np.float64)
    g = w.shape[0] if group_size is None else group_size
    same_group = np.repeat(agree, g, axis=0)[: w.shape[0]]
    if got_ints["neg"] is not None:
        same_group &= np.repeat(got_ints["neg"] == ints["neg"], g, axis=0)[: w.shape[0]]
    assert np.mean(dq[same_group] == want[same_group]) > 0.999  # the rest: nearest-level near-ties


@pytest.mark.parametrize("fmt,asym", FORMATS)
def test_every_weight_is_an_int8_times_the_channel_scale(fmt, asym):
    w = _weight(7)
    qt = aq.quantize(w, fmt, group_size=32, asym=asym, integer_scales=True)
    top = ref.integer_scale_top(fmt, asym)
    assert qt.scale.dtype == jnp.uint8 and int(np.max(qt.scale)) <= top and int(np.max(qt.scale)) >= 2
    dq = np.asarray(aq.dequantize(qt, jnp.float32), np.float64)
    ch = np.asarray(qt.channel_scale, np.float64)
    mult = 2 if fmt == "fp4_e2m1" else 1
    w8 = np.divide(dq * mult, ch, out=np.zeros_like(dq), where=ch > 0)
    np.testing.assert_array_equal(w8, np.round(w8))  # exact integers
    assert np.abs(w8).max() <= 127
    assert np.all(dq[:, 12] == 0) and float(ch[12]) == 0.0


def test_integer_scales_cost_little_error_on_gaussian_weights():
    w = np.random.default_rng(3).standard_normal((512, 64)).astype(np.float32)
    for fmt in ("int4", "fp4_e2m1"):
        mse = [float(np.mean((np.asarray(aq.dequantize(aq.quantize(w, fmt, group_size=128, integer_scales=i)))
                              - w) ** 2)) for i in (False, True)]
        assert mse[1] < 1.1 * mse[0], (fmt, mse)
    bits = [aq.quantize(w, "fp4", group_size=128, integer_scales=i).bits_per_weight for i in (False, True)]
    assert bits[1] < bits[0]  # uint8 group scales instead of float16


@pytest.mark.parametrize("fmt,asym,static", [(f, a, False) for f, a in FORMATS[:5]] + [("fp4_e2m1", True, True)])
def test_one_int8_gemm_equals_float64_emulation(fmt, asym, static):
    rng = np.random.default_rng(11)
    w = _weight(5)
    x = (rng.standard_normal((3, 5, w.shape[0])) * 4).astype(np.float32)
    qt = aq.quantize(w, fmt, group_size=48, asym=asym, integer_scales=True)
    scale = np.float32(0.03) if static else None
    y = np.asarray(quantized_matmul_a8(jnp.asarray(x), qt, None if scale is None else jnp.float32(scale)),
                   np.float64).reshape(-1, w.shape[1])
    want, bound = emulated_int8_matmul(x.reshape(-1, w.shape[0]), qt, scale)
    np.testing.assert_array_less(np.abs(y - want), 4e-7 * bound + 1e-30)  # one float32 epilogue rounding


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_w4a16_matmul_takes_integer_scales(implementation):
    w = _weight(9, k=256, n=64)
    qt = aq.quantize(w, "fp4", group_size=64, integer_scales=True)
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    y = quantized_matmul(jnp.asarray(x), qt, implementation=implementation, interpret=True)
    want = x.astype(np.float64) @ np.asarray(aq.dequantize(qt, jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1"])
def test_gptq_with_integer_scales_beats_rtn_on_its_hessian(fmt):
    rng = np.random.default_rng(2)
    k, n = 192, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((1024, k)) * (1 + 4 * rng.random(k))).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    top = ref.integer_scale_top(fmt, True)
    err = []
    for qt in (gptq_quantize(w, h, fmt, group_size=64, integer_scales=True),
               aq.quantize(w, fmt, group_size=64, integer_scales=True)):
        qt.validate()
        assert qt.integer_scales and int(np.max(qt.scale)) <= top
        d = x @ (np.asarray(aq.dequantize(qt)) - w)
        err.append(float(np.mean(d * d)))
    assert err[0] < 0.95 * err[1], err


def test_checkpoint_round_trip_with_integer_scales_and_int8_activations(tmp_path):
    scheme = aq.QuantScheme.create("fp4", group_size=32, integer_scales=True)
    qmodel = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, calibration=random_calibration(), progress=False,
                                    activations=aq.ActivationQuant(scheme="dynamic"))
    out = aq.save(qmodel, tmp_path / "ckpt")
    layers = json.loads((out / "quantization_config.json").read_text())["layers"]
    assert all(v["integer_scales"] and v["act_mode"] == "dynamic" for v in layers.values())
    restored = aq.load(out)
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(qmodel(ids)))
    layer = restored.linear_layers()["layers.0.attn.q_proj"]
    assert layer.quantized_tensor().integer_scales and layer.scale.get_value().dtype == jnp.uint8


def test_validate_rejects_integer_scales_past_the_int8_range():
    qt = aq.quantize(_weight(1), "fp4", group_size=32, integer_scales=True)
    too_big = qt.scale.at[0, 0].set(11)  # FP4 x2 levels reach 12: 11 x 12 > 127
    with pytest.raises(InputError, match="exceeds 10"):
        type(qt)(**{**qt.__dict__, "scale": too_big}).validate()
    with pytest.raises(InputError, match="uint8"):
        type(qt)(**{**qt.__dict__, "scale": qt.scale.astype(jnp.float16)}).validate()
    assert packing.packed_rows(100, 4) == qt.codes.shape[0]
