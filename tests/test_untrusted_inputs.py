"""User-supplied model files are checked by type and range: every bad config.json, index or safetensors header is
a one-line `CheckpointError` / `InputError` naming the file or field (issue #29), never a traceback or a silently
wrong model. Most tests call the readers directly (fast); three go through the convert CLI."""

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as official_load_file
from safetensors.numpy import save_file

from afpq_jax import convert as convert_cli
from afpq_jax._src.errors import ArgumentTypeError, CheckpointError, InputError
from afpq_jax._src.evaluation import perplexity
from afpq_jax._src.io.safetensors_reader import SafetensorsError, SafetensorsFile
from afpq_jax._src.io.sources import open_source
from afpq_jax._src.models import CausalLM, ModelConfig, config_from_hf

FIXTURES = Path(__file__).parent / "fixtures"


def _hf(name: str = "llama_gqa", **change) -> dict:
    """A fixture's config.json as a dict, with ``change`` applied (a value of ``...`` deletes the key)."""
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    for k, v in change.items():
        if v is ...:
            hf.pop(k, None)
        else:
            hf[k] = v
    return hf


def _copy(tmp_path: Path, name: str = "llama_gqa") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def _cli_error(capsys, model: Path, tmp_path: Path) -> str:
    """The one ``error:`` line of a failed in-process ``convert --method rtn`` (exit status 2, no traceback)."""
    rc = convert_cli.main(["--model", str(model), "--out", str(tmp_path / "out"), "--method", "rtn",
                           "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]  # the plan ("converting ...") precedes it
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (rc, err)
    assert not (tmp_path / "out").exists()
    return lines[0]


# ---- config.json and the shard index must be JSON objects ---------------------------------------------------

@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "5", "null"])
def test_config_json_that_is_not_an_object(tmp_path, text):
    d = _copy(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json must be a JSON object"):
        open_source(d)


def test_config_json_that_is_not_utf8(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config\.json is not UTF-8"):
        open_source(d)


def test_config_dict_that_is_not_an_object():
    # converted checkpoints read their config.json without `open_source`: config_from_hf checks it too
    with pytest.raises(CheckpointError, match=r"config\.json must be a JSON object"):
        config_from_hf([1, 2])
    with pytest.raises(InputError, match=r"unsupported model_type \['llama'\]"):
        config_from_hf(_hf(model_type=["llama"]))


@pytest.mark.parametrize("index,message", [
    ("[1]", r"model\.safetensors\.index\.json must be a JSON object"),
    ('{"weight_map": {"model.norm.weight": 5}}', r"weight_map must map tensor names to shard file names"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}',
     r"shard file names in the model's directory, got '\.\./elsewhere"),
])
def test_bad_shard_index(tmp_path, index, message):
    d = _copy(tmp_path, "llama_sharded")
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        open_source(d)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    # the reader used the last shard's copy: weights silently mixed from two files
    d = _copy(tmp_path)
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(d / "extra.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "extra.safetensors", "lm_head.weight": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is in both .*extra\.safetensors and "
                                              r".*model\.safetensors; remove the file"):
        open_source(d)


# ---- config.json fields: present, of the right type, in range ------------------------------------------------

@pytest.mark.parametrize("name,key", [
    ("llama_gqa", "hidden_size"), ("llama_gqa", "num_attention_heads"), ("llama_gqa", "vocab_size"),
    ("llama_gqa", "intermediate_size"), ("llama_gqa", "num_hidden_layers"),
    ("bloom", "n_head"), ("bloom", "n_layer"), ("bloom", "vocab_size"),
])
def test_missing_required_field(name, key):
    with pytest.raises(CheckpointError, match=rf"config\.json has no '{key}'( \(or '\w+'\))?; .*must have it"):
        config_from_hf(_hf(name, **{key: ...}))
    with pytest.raises(CheckpointError, match=rf"config\.json has no '{key}'"):  # null counts as missing
        config_from_hf(_hf(name, **{key: None}))


def test_bloom_field_aliases():
    # BloomConfig reads hidden_size / n_embed, n_head / num_attention_heads, n_layer / num_hidden_layers
    with pytest.raises(CheckpointError, match=r"config\.json has no 'hidden_size' \(or 'n_embed'\)"):
        config_from_hf(_hf("bloom", hidden_size=...))
    renamed = config_from_hf(_hf("bloom", hidden_size=..., n_embed=64, n_head=..., num_attention_heads=4,
                                 n_layer=..., num_hidden_layers=2))
    assert renamed == config_from_hf(_hf("bloom"))


_V5_THETA = {"rope_type": "default"}  # rope_parameters without its rope_theta, for bad thetas

LLAMA_BAD_FIELDS = [
    # key, value, message fragment
    ("rms_norm_eps", "1e-5", r"config\.json: rms_norm_eps must be a positive finite number, got '1e-5' \(a string\)"),
    ("rms_norm_eps", 0, r"rms_norm_eps must be a positive finite number, got 0"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps must be a positive finite number"),
    ("rms_norm_eps", math.nan, r"rms_norm_eps must be a positive finite number, got nan"),
    ("rms_norm_eps", True, r"rms_norm_eps must be a positive finite number, got True \(a boolean\)"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": 0}, r"rope_parameters\.rope_theta must be a positive finite"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": "1e4"}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": "abc"}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": -1.0}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": math.inf}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", [1, 2], r"config\.json: rope_parameters must be a JSON object, got \[1, 2\]"),
    ("rope_scaling", "linear", r"config\.json: rope_scaling must be a JSON object, got 'linear' \(a string\)"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, r"rope_scaling\.factor must be a positive finite"),
    ("rope_scaling", {"rope_type": "linear", "factor": "2"}, r"rope_scaling\.factor must be a positive finite"),
    ("rope_scaling", {"type": "linear"}, r"rope_scaling has no 'factor'; rope_type 'linear' needs it"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, r"rope_scaling has no 'low_freq_factor'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, r"high_freq_factor \(4\.0\) must be greater than"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 3.5}, r"original_max_position_embeddings must be a pos"),
    ("vocab_size", "256", r"config\.json: vocab_size must be a positive integer, got '256' \(a string\)"),
    ("vocab_size", 256.0, r"vocab_size must be a positive integer, got 256\.0"),
    ("vocab_size", True, r"vocab_size must be a positive integer, got True \(a boolean\)"),
    ("vocab_size", -1, r"vocab_size must be a positive integer, got -1"),
    ("hidden_size", "64", r"hidden_size must be a positive integer"),
    ("intermediate_size", 0, r"intermediate_size must be a positive integer, got 0"),
    ("num_hidden_layers", 2.5, r"num_hidden_layers must be a positive integer, got 2\.5"),
    ("num_attention_heads", True, r"num_attention_heads must be a positive integer"),
    ("num_key_value_heads", -2, r"num_key_value_heads must be a positive integer, got -2"),
    ("num_key_value_heads", 0, r"num_key_value_heads must be a positive integer, got 0"),
    ("head_dim", "16", r"head_dim must be a positive integer, got '16' \(a string\)"),
    ("max_position_embeddings", "128", r"max_position_embeddings must be a positive integer"),
    ("tie_word_embeddings", "false", r"tie_word_embeddings must be true or false, got 'false' \(a string\)"),
    ("attention_bias", 1, r"attention_bias must be true or false, got 1"),
    ("mlp_bias", "no", r"mlp_bias must be true or false"),
    ("bos_token_id", "1", r"bos_token_id must be an integer of at least 0, got '1' \(a string\)"),
    ("bos_token_id", 1.5, r"bos_token_id must be an integer of at least 0, got 1\.5"),
    ("eos_token_id", [2, "3"], r"eos_token_id\[1\] must be an integer of at least 0, got '3'"),
    ("eos_token_id", "2", r"eos_token_id must be an integer of at least 0"),
    ("eos_token_id", True, r"eos_token_id must be an integer of at least 0, got True"),
    ("hidden_act", 5, r"config\.json: hidden_act must be a string, got 5"),
]


@pytest.mark.parametrize("key,value,message", LLAMA_BAD_FIELDS)
def test_bad_llama_field(key, value, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(_hf(**{key: value}))


def test_bad_transformers4_rope_theta():
    hf = _hf(rope_parameters=..., rope_theta=0.0)
    with pytest.raises(CheckpointError, match=r"config\.json: rope_theta must be a positive finite number, got 0"):
        config_from_hf(hf)


def test_hidden_size_not_divisible_by_heads():
    hf = _hf(head_dim=..., num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(CheckpointError, match=r"hidden_size \(64\) must be divisible by num_attention_heads \(6\)"):
        config_from_hf(hf)


def test_mistral_sliding_window_must_be_an_integer():
    with pytest.raises(CheckpointError, match=r"sliding_window must be a positive integer, got '4096'"):
        config_from_hf(_hf(model_type="mistral", sliding_window="4096"))
    assert config_from_hf(_hf(model_type="mistral", sliding_window=64)).max_position_embeddings == 64


BLOOM_BAD_FIELDS = [
    ("layer_norm_epsilon", "1e-5", r"layer_norm_epsilon must be a positive finite number, got '1e-5'"),
    ("layer_norm_epsilon", 0.0, r"layer_norm_epsilon must be a positive finite number"),
    ("n_head", "4", r"n_head must be a positive integer, got '4' \(a string\)"),
    ("n_layer", 0, r"n_layer must be a positive integer, got 0"),
    ("hidden_size", 66, r"hidden_size \(66\) must be divisible by n_head \(4\)"),
    ("tie_word_embeddings", "yes", r"tie_word_embeddings must be true or false"),
    ("apply_residual_connection_post_layernorm", "false", r"apply_residual_connection_post_layernorm must be true"),
    ("seq_length", "2048", r"seq_length must be a positive integer"),
    ("eos_token_id", -2, r"eos_token_id must be an integer of at least 0, got -2"),
]


@pytest.mark.parametrize("key,value,message", BLOOM_BAD_FIELDS)
def test_bad_bloom_field(key, value, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(_hf("bloom", **{key: value}))


def test_valid_variants_are_still_read():
    cfg = config_from_hf(_hf(eos_token_id=[2, 3], head_dim=None, num_key_value_heads=None, rope_scaling=None))
    assert cfg.eos_token_id == (2, 3) and cfg.head_dim == 16 and cfg.num_kv_heads == 4
    hash(cfg)  # the graphdef holds it
    bloom = config_from_hf(_hf("bloom", eos_token_id=[2, 3]))
    assert bloom.eos_token_id == (2, 3)
    hash(bloom)  # a list eos made BLOOM's config unhashable
    assert config_from_hf(_hf("llama3_rope")).rope_scaling_dict["low_freq_factor"] == 1.0


@pytest.mark.parametrize("change,message", [
    ({"norm_eps": "1e-5"}, r"config\.norm_eps must be a positive finite number, got '1e-5' \(a string\)"),
    ({"rope_theta": 0.0}, r"config\.rope_theta must be a positive finite number"),
    ({"vocab_size": True}, r"config\.vocab_size must be a positive integer, got True"),
    ({"max_position_embeddings": 0}, r"config\.max_position_embeddings must be a positive integer"),
    ({"tie_embeddings": "no"}, r"config\.tie_embeddings must be true or false"),
    ({"norm": "batch"}, r"config\.norm must be one of 'rms', 'layer'"),
    ({"eos_token_id": [2, 3]}, r"config\.eos_token_id must be an integer or a tuple of them"),
    ({"rope_scaling": (("rope_type", "linear"),)}, r"rope_scaling has no 'factor'"),
])
def test_model_config_validates_every_field(change, message):
    base = config_from_hf(_hf())
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(InputError, match=message):
        ModelConfig(**{**fields, **change})


# ---- safetensors headers -------------------------------------------------------------------------------------

def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


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
    f = _write(tmp_path / "m.safetensors", header, bytes(range(size)))
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(f)
    with pytest.raises(Exception):  # the official reader refuses it too
        official_load_file(str(f))


def test_safetensors_headers_the_official_reader_accepts_still_open(tmp_path):
    ok = {"__metadata__": {"format": "pt"}, "b": _B, "a": _A, "e": {"dtype": "F32", "shape": [0, 3],
                                                                     "data_offsets": [16, 16]}}
    f = _write(tmp_path / "m.safetensors", ok, np.arange(4, dtype=np.float32).tobytes())
    ours = dict(SafetensorsFile(f).items())
    theirs = official_load_file(str(f))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
    _write(f, {"__metadata__": None, "a": _A}, bytes(8))
    assert SafetensorsFile(f).keys() == ["a"] and official_load_file(str(f)).keys() == {"a"}


def test_offsets_pointing_at_another_tensors_bytes(tmp_path):
    # k_proj's offsets point at v_proj's bytes (same shape in this GQA model): the reader accepted the file and
    # a model with v_proj's weights as k_proj's was converted
    d = _copy(tmp_path)
    st = d / "model.safetensors"
    header, data = _read_header(st)
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    header[k] = {**header[k], "data_offsets": header[v]["data_offsets"]}
    _write(st, header, data)
    with pytest.raises(Exception):
        official_load_file(str(st))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.v_proj\."
                                              r"weight' overlaps tensor 'model\.layers\.0\.self_attn\.k_proj"):
        open_source(d)


# ---- perplexity checks token ids like the model's forward pass -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return CausalLM(config_from_hf(_hf()))  # vocab 256


@pytest.mark.parametrize("bad,error,message", [
    (300, InputError, r"token ids must lie in \[0, 256\), got \[0, 300\]"),
    (-1, InputError, r"token ids must lie in \[0, 256\), got \[-1, "),
    (2**32 + 5, InputError, r"token ids must lie in \[0, 256\)"),  # int32 wrapped it to 5
])
def test_perplexity_refuses_out_of_vocabulary_ids(tiny_model, bad, error, message):
    ids = np.arange(16, dtype=np.int64) % 200
    ids[5] = bad
    with pytest.raises(error, match=message):
        perplexity(tiny_model, ids, seq_len=8, progress=False)


def test_perplexity_refuses_float_ids(tiny_model):
    with pytest.raises(ArgumentTypeError, match=r"token_ids must be integer token ids, got dtype float64"):
        perplexity(tiny_model, np.arange(16) + 0.5, seq_len=8, progress=False)
    with pytest.raises(InputError, match="fewer than one window"):  # an empty list is numpy float64
        perplexity(tiny_model, [], seq_len=8, progress=False)


# ---- the CLI: one "error:" line naming the field, exit status 2 ------------------------------------------------

def test_cli_string_eps_is_one_line(tmp_path, capsys):
    d = _copy(tmp_path)
    (d / "config.json").write_text(json.dumps(_hf(rms_norm_eps="1e-5")))
    line = _cli_error(capsys, d, tmp_path)
    assert "config.json: rms_norm_eps must be a positive finite number, got '1e-5' (a string)" in line


def test_cli_config_list_is_one_line(tmp_path, capsys):
    d = _copy(tmp_path)
    (d / "config.json").write_text("[1, 2]")
    assert "config.json must be a JSON object" in _cli_error(capsys, d, tmp_path)


def test_cli_overlapping_safetensors_offsets_is_one_line(tmp_path, capsys):
    d = _copy(tmp_path)
    st = d / "model.safetensors"
    header, data = _read_header(st)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"  # both 64 x 64
    header[q] = {**header[q], "data_offsets": header[o]["data_offsets"]}
    _write(st, header, data)
    line = _cli_error(capsys, d, tmp_path)
    assert f"model.safetensors: tensor '{q}' overlaps tensor '{o}'" in line
