"""The afpq safetensors layout (README "The `afpq` layout"), against a numpy decoder written from that
description, for every format x sym/asym x group x scale dtype, and read back into the same packed weight."""

from __future__ import annotations

import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.interop import afpq_safetensors as afpq
from tests.interop.test_compressed_tensors import _unpack_rows


def _decode(t: dict, scheme: QuantScheme) -> np.ndarray:
    """The float64 weight [out, in] the README's rules give: level[q]·s (s_neg below zero for asymmetric code
    books), (q − zero)·s for INT; s = stored · channel_scale, or stored / global_scale (as stored · (1/global) in
    float32), or 2^(e−127) for E8M0 bytes."""
    out_f, in_f = (int(v) for v in t["weight_shape"])
    fmt = aq.formats.get_format(scheme.format)
    q = _unpack_rows(t["weight_packed"], fmt.bits, in_f)  # (out, in) codes

    def scale(name):
        s = t[name]
        if scheme.scale_dtype == "float8_e8m0fnu":
            s = np.exp2(s.astype(np.float64) - 127).astype(np.float32)
        s = s.astype(np.float32)
        if "weight_channel_scale" in t:
            s = s * t["weight_channel_scale"].astype(np.float32)[:, None]
        if "weight_global_scale" in t:
            s = s * (np.float32(1) / t["weight_global_scale"][0])
        return s

    g = in_f if scheme.group_size is None else min(scheme.group_size, in_f)
    idx = np.arange(in_f) // g
    s_pos = scale("weight_scale")[:, idx]
    if fmt.is_int:
        zero = t["weight_zero_point"].astype(np.float32)[:, idx] if scheme.asym else 2.0 ** (fmt.bits - 1)
        return ((q - zero).astype(np.float32) * s_pos).astype(np.float64)
    level = np.asarray(fmt.levels, np.float32)[q]
    s = np.where(level < 0, scale("weight_scale_neg")[:, idx], s_pos) if scheme.asym else s_pos
    return (level * s).astype(np.float64)


SCALES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e8m0fnu")
CASES = [(f, a, g, sd) for f in ("int2", "int3", "int4", "int8", "nf4", "nf3", "fp4_e2m1", "fp3_e2m0")
         for a in (False, True) for g, sd in ((32, SCALES[(len(f) + a) % 3]), (None, "float16"),
                                                (16, "float8_e4m3fn"), (32, "float8_e8m0fnu"))]


@pytest.mark.parametrize("fmt,asym,group,scale_dtype", CASES)
def test_every_scheme_decodes_by_the_readme_and_reads_back(fmt, asym, group, scale_dtype):
    w = np.random.default_rng(len(fmt) * 7 + asym).standard_normal((100, 24)).astype(np.float32)
    scheme = QuantScheme.create(fmt, group_size=group, asym=asym, scale_dtype=scale_dtype)
    qt = scheme.quantize(w)
    t = afpq.encode_layer(qt)
    want = np.asarray(aq.dequantize(qt), np.float64).T
    np.testing.assert_array_equal(_decode(t, scheme), want)
    back, input_scale, perm = afpq.decode_layer(t, scheme, "float32", "layer")
    assert input_scale is None and perm is None
    for name in ("codes", "scale", "scale_neg", "zero", "channel_scale", "global_scale"):
        a, b = getattr(qt, name), getattr(back, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), err_msg=name)


def test_integer_scales_activation_scale_and_permutation_travel():
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    scheme = QuantScheme.create("int4", group_size=32, integer_scales=True, act_bits=8, act_mode="static",
                                act_order_groups=True)
    qt = scheme.quantize(w)
    perm = np.random.default_rng(1).permutation(64).astype(np.int32)
    t = afpq.encode_layer(qt, 0.25, perm)
    assert t["weight_scale"].dtype == np.uint8 and t["weight_channel_scale"].shape == (16,)
    np.testing.assert_array_equal(_decode(t, scheme), np.asarray(aq.dequantize(qt), np.float64).T)
    back, input_scale, got = afpq.decode_layer(t, scheme, "float32", "layer")
    assert input_scale == 0.25 and np.array_equal(got, perm)
    with pytest.raises(CheckpointError, match="input_perm must be an int32 permutation"):
        afpq.decode_layer({**t, "input_perm": np.zeros(64, np.int32)}, scheme, "float32", "layer")
    with pytest.raises(CheckpointError, match="missing tensor weight_channel_scale"):
        afpq.decode_layer({k: v for k, v in t.items() if k != "weight_channel_scale"}, scheme, "float32", "layer")
