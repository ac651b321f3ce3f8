"""The safetensors reader refuses bad headers the official reader refuses, and reads what it accepts."""

import numpy as np
import pytest
from safetensors.numpy import load_file as official_load_file

from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.io.safetensors_io import SafetensorsError, SafetensorsFile
from afpq_jax._src.io.sources import open_source
from tests.support import read_safetensors_header, write_safetensors
from tests.support import copy_fixture

# ---- safetensors headers -------------------------------------------------------------------------------------

_A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}

BAD_HEADERS = [
    # header, data bytes, message fragment
    ([_A], 8, r"header is not a JSON object"),
    ({"a": {**_A, "shape": [-2]}}, 8, r"tensor 'a' has shape \[-2\]; .*integers >= 0"),
    ({"a": {**_A, "shape": [2.0]}}, 8, r"tensor 'a' has shape \[2\.0\]"),
    ({"a": {**_A, "shape": "2"}}, 8, r"tensor 'a' has shape '2'"),
    ({"a": {**_A, "shape": [True, 2]}}, 8, r"tensor 'a' has shape \[True, 2\]"),
    ({"a": {**_A, "data_offsets": ["0", "8"]}}, 8, r"tensor 'a' has data_offsets \['0', '8'\]; .*two integers"),
    ({"a": {**_A, "data_offsets": [0, 8.0]}}, 8, r"tensor 'a' has data_offsets \[0, 8\.0\]"),
    ({"a": {**_A, "data_offsets": [0, 8, 9]}}, 8, r"tensor 'a' has data_offsets \[0, 8, 9\]"),
    ({"a": {**_A, "shape": [0], "data_offsets": [8, 0]}}, 8, r"tensor 'a' has data_offsets \[8, 0\]"),
    ({"a": {**_A, "dtype": ["F32"]}}, 8, r"tensor 'a' has dtype \['F32'\]; .*a string"),
    ({"a": {**_A, "dtype": "F8_E8M0"}}, 8, r"tensor 'a' has unsupported dtype 'F8_E8M0'"),
    ({"a": [1]}, 8, r"header entry 'a' is not an object"),
    ({"a": _A, "b": {**_B, "data_offsets": [0, 8]}}, 8, r"tensor 'b' overlaps tensor 'a'"),
    ({"a": _A, "b": {**_B, "data_offsets": [12, 20]}}, 20, r"4 bytes before tensor 'b' belong to no tensor"),
    ({"a": {**_A, "data_offsets": [4, 12]}}, 12, r"4 bytes before tensor 'a' belong to no tensor"),
    ({"a": _A, "b": _B}, 20, r"4 bytes after its last tensor"),
    ({"__metadata__": ["pt"], "a": _A}, 8, r"__metadata__ must map strings to strings"),
    ({"__metadata__": {"format": 1}, "a": _A}, 8, r"__metadata__ must map strings to strings"),
]


@pytest.mark.parametrize("header,size,message", BAD_HEADERS)
def test_bad_safetensors_header(tmp_path, header, size, message):
    f = write_safetensors(tmp_path / "m.safetensors", header, bytes(range(size)))
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(f)
    with pytest.raises(Exception):  # the official reader refuses it too
        official_load_file(str(f))


def test_safetensors_headers_the_official_reader_accepts_still_open(tmp_path):
    ok = {"__metadata__": {"format": "pt"}, "b": _B, "a": _A, "e": {"dtype": "F32", "shape": [0, 3],
                                                                     "data_offsets": [16, 16]}}
    f = write_safetensors(tmp_path / "m.safetensors", ok, np.arange(4, dtype=np.float32).tobytes())
    ours = dict(SafetensorsFile(f).items())
    theirs = official_load_file(str(f))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
    write_safetensors(f, {"__metadata__": None, "a": _A}, bytes(8))
    assert SafetensorsFile(f).keys() == ["a"] and official_load_file(str(f)).keys() == {"a"}


def test_offsets_pointing_at_another_tensors_bytes(tmp_path):
    # k_proj's offsets point at v_proj's bytes (same shape in this GQA model): the reader accepted the file and
    # a model with v_proj's weights as k_proj's was converted
    d = copy_fixture(tmp_path)
    st = d / "model.safetensors"
    header, data = read_safetensors_header(st)
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    header[k] = {**header[k], "data_offsets": header[v]["data_offsets"]}
    write_safetensors(st, header, data)
    with pytest.raises(Exception):
        official_load_file(str(st))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.v_proj\."
                                              r"weight' overlaps tensor 'model\.layers\.0\.self_attn\.k_proj"):
        open_source(d)
