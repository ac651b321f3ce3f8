"""`read_gguf` (the GGUF header, metadata and tensor directory) against the ``gguf`` package's own reader and
writer, and on damaged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from afpq_jax._src.errors import InputError
from afpq_jax._src.io import gguf_container
from afpq_jax._src.io.gguf_container import read_gguf
from tests.support import tiny_hf_weights, write_tiny_llama

gguf = pytest.importorskip("gguf")


def _reference_value(field):
    """A metadata value as gguf.GGUFReader decodes it (its ReaderField.contents)."""
    v = field.contents()
    if isinstance(v, float) and field.types[0] == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(v)))
    if isinstance(v, list) and field.types[-1] == gguf.GGUFValueType.FLOAT32:
        return [float(str(np.float32(x))) for x in v]
    return v


def _every_value_type(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    T = gguf.GGUFValueType
    w.add_key_value("t.u8", 200, T.UINT8)
    w.add_key_value("t.i8", -100, T.INT8)
    w.add_key_value("t.u16", 60000, T.UINT16)
    w.add_key_value("t.i16", -30000, T.INT16)
    w.add_key_value("t.u32", 4_000_000_000, T.UINT32)
    w.add_key_value("t.i32", -2_000_000_000, T.INT32)
    w.add_key_value("t.u64", 2**63 + 5, T.UINT64)
    w.add_key_value("t.i64", -(2**62), T.INT64)
    w.add_key_value("t.f32", 1e-5, T.FLOAT32)
    w.add_key_value("t.f64", 0.1, T.FLOAT64)
    w.add_key_value("t.bool", True, T.BOOL)
    w.add_key_value("t.str", "héllo ✓", T.STRING)
    w.add_key_value("t.strs", ["a", "", "ünï", "x y"], T.ARRAY, sub_type=T.STRING)
    w.add_key_value("t.ints", [3, -1, 7], T.ARRAY, sub_type=T.INT32)
    w.add_key_value("t.floats", [0.5, 1e-5, -2.25], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("t.bools", [True, False], T.ARRAY, sub_type=T.BOOL)
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.linspace(-1, 1, 10, dtype=np.float16).reshape(2, 5))
    w.add_tensor("i32", np.arange(-3, 3, dtype=np.int32))
    rng = np.random.default_rng(0)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        x = rng.standard_normal((3, 256)).astype(np.float32)
        w.add_tensor(f"q.{qtype.name}", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    # k-quants (the gguf package cannot quantize them): any bytes are a valid block
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
        w.add_tensor(f"q.{qtype.name}", rng.integers(0, 256, (2, nbytes), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("gguf")
    return [_every_value_type(d / "types.gguf"),
            write_tiny_llama(d / "tiny.gguf", tiny_hf_weights(np.random.default_rng(0), tied=False))]


def test_metadata_and_tensors_equal_the_gguf_packages_reader(files):
    for path in files:
        ref = gguf.GGUFReader(path)
        got = read_gguf(path)
        assert got.version == 3
        want = {k: _reference_value(f) for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert got.metadata == want
        assert [t.name for t in got.tensors] == [t.name for t in ref.tensors]
        for g, r in zip(got.tensors, ref.tensors):
            assert g.shape == tuple(int(d) for d in r.shape) and g.tensor_type == r.tensor_type, g.name
            assert g.offset == r.data_offset and g.n_bytes == r.n_bytes, g.name
            assert g.data.dtype == r.data.dtype and g.data.shape == r.data.shape, g.name
            np.testing.assert_array_equal(g.data, r.data, err_msg=g.name)
            if g.name != "i32":  # (integer tensors have no dequantizer)
                np.testing.assert_array_equal(gguf.quants.dequantize(g.data, g.tensor_type),
                                              gguf.quants.dequantize(r.data, r.tensor_type), err_msg=g.name)


def test_exact_values_of_every_metadata_type(files):
    m = read_gguf(files[0]).metadata
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
    assert m["t.f32"] == 1e-05 and m["t.f64"] == 0.1 and m["t.bool"] is True
    assert m["t.str"] == "héllo ✓" and m["t.strs"] == ["a", "", "ünï", "x y"]
    assert m["t.ints"] == [3, -1, 7] and m["t.floats"] == [0.5, 1e-05, -2.25] and m["t.bools"] == [True, False]


def test_a_header_longer_than_the_first_read_is_read_again(files, monkeypatch):
    whole = read_gguf(files[1]).metadata
    monkeypatch.setattr(gguf_container, "_FIRST_READ", 64)
    assert read_gguf(files[1]).metadata == whole


def test_damaged_files_give_one_line_input_errors(files, tmp_path):
    raw = files[1].read_bytes()
    cases = {
        "magic": (b"GGML" + raw[4:], "not a readable GGUF file"),
        "version": (raw[:4] + (7).to_bytes(4, "little") + raw[8:], "GGUF version 7"),
        "big-endian": (raw[:4] + (3).to_bytes(4, "big") + raw[8:], "big-endian"),
        "header cut": (raw[:300], "header ends early"),
        "data cut": (raw[:-100], "truncated"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(InputError, match=message) as e:
            read_gguf(path)
        assert "\n" not in str(e.value), name
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
