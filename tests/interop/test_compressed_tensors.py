"""compressed-tensors' layer layouts, against a numpy decoder written from the format's description
(`shared/interop.md`), independent of the encoder."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.errors import CheckpointError, NotExportable
from afpq_jax._src.interop import compressed_tensors as ct

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _unpack_rows(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 rows -> ``count`` unsigned values per row: value i at bits i*bits.. of the row (LSB first)."""
    out = np.zeros((words.shape[0], count), np.int64)
    for r in range(words.shape[0]):
        stream = int.from_bytes(words[r].astype("<i4").tobytes(), "little")
        for i in range(count):
            out[r, i] = (stream >> (i * bits)) & ((1 << bits) - 1)
    return out


def _decode(tensors: dict, scheme: dict) -> np.ndarray:
    """The float [out, in] weight compressed-tensors' decompressor would produce (float64)."""
    b = scheme["num_bits"]
    if scheme["type"] == "int":
        out_f, in_f = (int(v) for v in tensors["weight_shape"])
    else:  # FP4: no weight_shape; two codes a byte
        out_f, in_f = tensors["weight_packed"].shape[0], 2 * tensors["weight_packed"].shape[1]
    if scheme["type"] == "int":
        q = _unpack_rows(tensors["weight_packed"], b, in_f) - 2 ** (b - 1)  # signed values
        scale = tensors["weight_scale"].astype(np.float64)
        zp = 0
        if not scheme["symmetric"]:
            zp = _unpack_rows(np.ascontiguousarray(tensors["weight_zero_point"].T), b, out_f).T - 2 ** (b - 1)
        g = in_f if scheme["strategy"] == "channel" else scheme["group_size"]
        idx = tensors["weight_g_idx"].astype(np.int64) if "weight_g_idx" in tensors else np.arange(in_f) // g
        zp = zp[:, idx] if np.ndim(zp) else 0
        return ((q - zp).astype(np.float32) * scale[:, idx].astype(np.float32)).astype(np.float64)  # float32 math
    packed = tensors["weight_packed"]
    nib = np.stack([packed & 15, packed >> 4], axis=-1).reshape(out_f, -1)[:, :in_f]
    value = np.where(nib >= 8, -1.0, 1.0) * E2M1[nib & 7]
    g = scheme["group_size"]
    if "weight_global_scale" in tensors:
        scale = tensors["weight_scale"].astype(np.float64) / float(tensors["weight_global_scale"][0])
    else:
        scale = np.exp2(tensors["weight_scale"].astype(np.float64) - 127)
    return value * scale[:, np.arange(in_f) // g]


def test_dense_packing_matches_a_bit_by_bit_reference():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        for cols in (1, 10, 11, 32, 33):
            v = rng.integers(0, 2**bits, (3, cols))
            words = ct.pack_rows_int32(v, bits)
            assert words.dtype == np.int32 and words.shape == (3, -(-cols * bits // 32))
            np.testing.assert_array_equal(_unpack_rows(words, bits, cols), v)
    # 4-bit: word j holds elements 8j..8j+7, element 8j+k at bits 4k..4k+3
    assert ct.pack_rows_int32(np.arange(8)[None], 4)[0, 0] == 0x76543210


CASES = [("int4", 128, True, "float16"), ("int4", 32, False, "bfloat16"), ("int8", None, False, "float32"),
         ("int2", 64, True, "float16"), ("int3", 128, True, "float16"), ("int4", None, True, "float16")]


@pytest.mark.parametrize("fmt,group,asym,scale_dtype", CASES)
def test_pack_quantized_layers_decode_to_our_weights(fmt, group, asym, scale_dtype):
    w = np.random.default_rng(1).standard_normal((200, 48)).astype(np.float32)
    qt = aq.quantize(w, fmt, group_size=group, asym=asym, scale_dtype=scale_dtype)
    tensors = ct.encode_layer(qt)
    scheme = ct.weights_scheme(qt)
    assert ct.layer_format(qt) == "pack-quantized" and scheme["symmetric"] == (not asym)
    assert tensors["weight_packed"].shape == (48, -(-200 * qt.format.bits // 32))
    if asym:
        assert tensors["weight_zero_point"].shape == (-(-48 * qt.format.bits // 32), qt.num_groups)
    np.testing.assert_array_equal(_decode(tensors, scheme), np.asarray(aq.dequantize(qt), np.float64).T)


@pytest.mark.parametrize("preset,fmt_name", [("nvfp4", "nvfp4-pack-quantized"), ("mxfp4", "mxfp4-pack-quantized")])
def test_micro_scaled_fp4_layers_decode_to_our_weights(preset, fmt_name):
    w = np.random.default_rng(2).standard_normal((96, 40)).astype(np.float32)
    w[:, 3] = 0.0
    qt = QuantScheme.preset(preset).quantize(w)
    tensors = ct.encode_layer(qt)
    assert ct.layer_format(qt) == fmt_name and "weight_shape" not in tensors
    assert tensors["weight_packed"].dtype == np.uint8 and tensors["weight_packed"].shape == (40, 48)
    got = _decode(tensors, ct.weights_scheme(qt))
    want = np.asarray(aq.dequantize(qt), np.float64).T
    # NVFP4 divides by the global scale; we multiply by its float32 reciprocal: within an ulp of float32
    np.testing.assert_allclose(got, want, rtol=2**-22, atol=0)
    if preset == "mxfp4":
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scheme,reason", [
    (QuantScheme.preset("nvfp4", asym=True), "two scales"),
    (QuantScheme.create("nf4"), "nf4 code book"),
    (QuantScheme.create("fp3_e2m0", asym=False), "fp3_e2m0 code book"),
    (QuantScheme.create("fp4_e2m1", asym=False), "float16 scales in groups of 128"),
    (QuantScheme.create("int4", group_size=16, scale_dtype="float8_e4m3fn"), "float8_e4m3fn scales on integer"),
])
def test_layers_without_an_exact_form_are_refused_with_the_reason(scheme, reason):
    qt = scheme.quantize(np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32))
    assert reason in ct.why_not_exportable(qt)
    with pytest.raises(NotExportable, match=reason):
        ct.encode_layer(qt)


def test_checkpoint_dtype_must_hold_the_int_scales_and_fp4_groups_must_be_whole():
    w = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    qt = aq.quantize(w, "int4", group_size=32, scale_dtype="float16")
    assert ct.why_not_exportable(qt, "float16") is None and ct.why_not_exportable(qt, "float32") is None
    assert "not exact in bfloat16" in ct.why_not_exportable(qt, "bfloat16")
    assert ct.encode_layer(qt, dtype="float16")["weight_scale"].dtype == np.float16
    assert ct.encode_layer(qt)["weight_scale"].dtype == np.float32
    short = QuantScheme.preset("nvfp4").quantize(np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32))
    assert "not a multiple of the group size 16" in ct.why_not_exportable(short)


@pytest.mark.parametrize("fmt,group,asym,scale_dtype", CASES)
def test_layers_read_back_into_the_same_packed_weight(fmt, group, asym, scale_dtype):
    qt = aq.quantize(np.random.default_rng(4).standard_normal((200, 48)).astype(np.float32), fmt,
                     group_size=group, asym=asym, scale_dtype=scale_dtype)
    back, perm = ct.decode_layer(ct.encode_layer(qt), ct.weights_scheme(qt), ct.layer_format(qt), dtype="float32",
                                 where="layer")
    assert perm is None and back.asym == asym and back.group_size == (None if group is None else group)
    for name in ("codes", "scale", "zero"):
        a, b = getattr(qt, name), getattr(back, name)
        assert (a is None) == (b is None) and (a is None or np.array_equal(np.asarray(a), np.asarray(b))), name
    for preset in ("nvfp4", "mxfp4"):
        qt = QuantScheme.preset(preset).quantize(np.random.default_rng(5).standard_normal((96, 40)).astype(np.float32))
        back, _ = ct.decode_layer(ct.encode_layer(qt), ct.weights_scheme(qt), ct.layer_format(qt), dtype="float32",
                                  where="layer")
        np.testing.assert_array_equal(np.asarray(aq.dequantize(back)), np.asarray(aq.dequantize(qt)))


def test_activation_order_files_are_read_as_rows_in_group_order():
    """Older compressed-tensors files with ``actorder: "group"`` carry ``weight_g_idx``: read into rows stored in
    group order plus the permutation (the weight in the input's order is what the reference decoder gives)."""
    qt = aq.quantize(np.random.default_rng(6).standard_normal((128, 16)).astype(np.float32), "int4", group_size=32)
    perm = np.random.default_rng(7).permutation(128)  # input row perm[j] takes stored row j (its group: j // 32)
    tensors = ct.encode_layer(qt)
    codes = _unpack_rows(tensors["weight_packed"], 4, 128)[:, np.argsort(perm)]  # (out, in) in the input's order
    g_idx = np.empty(128, np.int32)
    g_idx[perm] = np.arange(128) // 32
    tensors = {**tensors, "weight_packed": ct.pack_rows_int32(codes, 4), "weight_g_idx": g_idx}
    scheme = {**ct.weights_scheme(qt), "actorder": "group"}
    in_order = np.asarray(aq.dequantize(qt), np.float64)[np.argsort(perm)]
    np.testing.assert_array_equal(_decode(tensors, scheme), in_order.T)
    back, got_perm = ct.decode_layer(tensors, scheme, "pack-quantized", dtype="float32", where="layer")
    np.testing.assert_array_equal(np.asarray(aq.dequantize(back))[np.argsort(got_perm)], in_order)
    with pytest.raises(CheckpointError, match="actorder 'group' but no weight_g_idx"):
        ct.decode_layer({k: v for k, v in tensors.items() if k != "weight_g_idx"}, scheme, "pack-quantized",
                        dtype="float32", where="layer")
    with pytest.raises(CheckpointError, match="weight_zero_point do not belong"):
        ct.decode_layer({**ct.encode_layer(aq.quantize(np.ones((64, 8), np.float32) * np.arange(8), "int4",
                                                       group_size=32, asym=True))},
                        {**ct.weights_scheme(qt), "symmetric": True}, "pack-quantized", dtype="float32",
                        where="layer")


def test_three_bit_files_of_releases_before_0_18_are_read():
    """compressed-tensors < 0.18 put 10 three-bit codes in a word (bits 3i, the top two unused); told apart from
    the dense layout by shape, and by the config's version where the shapes agree."""
    qt = aq.quantize(np.random.default_rng(8).standard_normal((64, 8)).astype(np.float32), "int3", group_size=32)
    tensors = ct.encode_layer(qt)
    codes = _unpack_rows(tensors["weight_packed"], 3, 64)  # (out, in)
    padded = np.zeros((8, 7), np.int64)
    for i in range(64):
        padded[:, i // 10] |= codes[:, i] << (3 * (i % 10))
    old = {**tensors, "weight_packed": padded.astype(np.uint32).view(np.int32)}
    scheme = ct.weights_scheme(qt)
    for version in (None, "0.17.1"):
        back, _ = ct.decode_layer(old, scheme, "pack-quantized", dtype="float32", where="layer", version=version)
        np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qt.codes))
    back, _ = ct.decode_layer(tensors, scheme, "pack-quantized", dtype="float32", where="layer", version="0.20.1")
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qt.codes))


LIBRARY = Path(__file__).resolve().parents[1] / "fixtures" / "compressed_tensors"
LIBRARY_CASES = json.loads((LIBRARY / "cases.json").read_text())["cases"]


@pytest.mark.parametrize("name", sorted(LIBRARY_CASES))
def test_layers_compressed_by_the_library_itself_read_as_it_decompresses_them(name):
    """compressed-tensors 0.20.1's own compressors wrote these layers and decompressed them again
    (scripts/make_compressed_tensors_fixtures.py): our reader, from the compressed tensors alone, gives the
    library's weights bit for bit. Its NVFP4 decompressor works in bfloat16 (the dtype it unpacks FP4 into), so
    there ours is compared rounded to bfloat16; everywhere else in float32, as it computes."""
    from afpq_jax._src.io.safetensors_io import SafetensorsFile
    case = LIBRARY_CASES[name]
    f = SafetensorsFile(LIBRARY / f"{name}.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    reference = tensors.pop("reference")
    qt, perm = ct.decode_layer(tensors, case["weights"], case["format"], dtype="float32", where=name)
    assert perm is None
    got = np.asarray(aq.dequantize(qt), np.float32).T  # ours is (in, out)
    if case["format"] == "nvfp4-pack-quantized":
        got = got.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, reference)


OURS_CASES = json.loads((LIBRARY / "ours" / "cases.json").read_text())


@pytest.mark.parametrize("name", sorted(OURS_CASES))
def test_layers_we_write_are_decompressed_by_the_library_to_our_weights(name):
    """The other direction: layers our encoder wrote (scripts/export_compressed_tensors_layers.py), decompressed
    by compressed-tensors 0.20.1 itself, give our weights (NVFP4: bfloat16, as the library computes it); and
    today's encoder writes those bytes again from the layer they decode to."""
    from afpq_jax._src.io.safetensors_io import SafetensorsFile
    case = OURS_CASES[name]
    f = SafetensorsFile(LIBRARY / "ours" / f"{name}.safetensors")
    stored = {k: f.read(k) for k in f.keys()}
    reference = SafetensorsFile(LIBRARY / "ours" / f"{name}.reference.safetensors").read("reference")
    qt, _ = ct.decode_layer(stored, case["weights"], case["format"], dtype="float32", where=name)
    assert ct.weights_scheme(qt) == case["weights"] and ct.layer_format(qt) == case["format"]
    again = ct.encode_layer(qt)
    assert again.keys() == stored.keys()
    for key in stored:
        assert again[key].dtype == stored[key].dtype and np.array_equal(again[key].view(np.uint8),
                                                                        stored[key].view(np.uint8)), key
    got = np.asarray(aq.dequantize(qt), np.float32).T
    if case["format"] == "nvfp4-pack-quantized":
        got = got.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, reference)
