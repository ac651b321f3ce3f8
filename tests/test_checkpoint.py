"""Loading trusts only what it verifies (`afpq_jax._src.checkpoint.load`): each layer's scheme and the dtype are
recorded beside the packed arrays when they are written and compared with quantization_config.json; every leaf's
shape and dtype must be the ones the file implies (orbax would cast a dtype silently); our own JSON files are
checked by type. Was: editing one layer's format, group size or scale dtype loaded without a word and gave wrong
logits (off by 4.26 / 1.24 / 0.055)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import afpq_jax as aq
from afpq_jax import eval as eval_cli
from afpq_jax._src import checkpoint
from afpq_jax._src.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
LAYER = "layers.0.attn.q_proj"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    rules = [aq.QuantRule(pattern=r"layers\.0\.attn\.q_proj", scheme=aq.QuantScheme.create("nf3", group_size=32)),
             aq.QuantRule(pattern=r".*_proj", scheme=aq.QuantScheme.create("int4", group_size=16))]
    out = tmp_path_factory.mktemp("ckpt") / "q"
    aq.save(aq.quantize_pretrained(FIXTURES / "llama_gqa", rules, progress=False), out)
    return out


def _edited(converted: Path, tmp_path: Path, edit, *, legacy: bool = False) -> Path:
    d = tmp_path / "edited"
    shutil.copytree(converted, d)
    qc_path = d / checkpoint.QUANT_CONFIG
    qc = json.loads(qc_path.read_text())
    edit(qc)
    qc_path.write_text(json.dumps(qc))
    if legacy:  # as written before schemes were recorded beside the arrays
        meta_path = d / checkpoint.PARAMS_DIR / "_CHECKPOINT_METADATA"
        meta = json.loads(meta_path.read_text())
        meta["custom_metadata"] = {}
        meta_path.write_text(json.dumps(meta))
    return d


def _set(key, value):
    return lambda qc: qc["layers"][LAYER].__setitem__(key, value)


@pytest.mark.parametrize("key,value,difference", [
    ("format", "fp3_e2m0", "format 'nf3' -> 'fp3_e2m0'"),   # same leaf shapes and dtypes: only the record tells
    ("group_size", 48, "group_size 32 -> 48"),
    ("scale_dtype", "bfloat16", "scale_dtype 'float16' -> 'bfloat16'"),
    ("asym", False, "asym True -> False"),
])
def test_an_edited_layer_scheme_is_refused_naming_the_layer(converted, tmp_path, key, value, difference):
    d = _edited(converted, tmp_path, _set(key, value))
    with pytest.raises(CheckpointError) as e:
        aq.load(d)
    assert f"layer {LAYER} differs from the scheme its arrays were written with ({difference})" in str(e.value)


def test_dropped_or_added_layers_and_the_dtype_are_refused(converted, tmp_path):
    with pytest.raises(CheckpointError, match=f"layer {LAYER} is missing from the file"):
        aq.load(_edited(converted, tmp_path / "a", lambda qc: qc["layers"].pop(LAYER)))
    extra = {"format": "int4", "group_size": 16, "asym": True, "scale_dtype": "float16"}
    with pytest.raises(CheckpointError, match="layer lm_head is not in the arrays"):
        aq.load(_edited(converted, tmp_path / "b", lambda qc: qc["layers"].__setitem__("lm_head", extra)))
    with pytest.raises(CheckpointError, match="dtype 'bfloat16' differs from the 'float32'"):
        aq.load(_edited(converted, tmp_path / "c", lambda qc: qc.__setitem__("dtype", "bfloat16")))


@pytest.mark.parametrize("key,value,message", [
    ("group_size", 16, rf"{LAYER}\.scale is stored as float16\[2, 64\] but the file describes float16\[4, 64\]"),
    ("scale_dtype", "float32", rf"{LAYER}\.scale is stored as float16\[2, 64\] but the file describes float32"),
])
def test_without_a_record_shapes_and_dtypes_still_must_match(converted, tmp_path, caplog, key, value, message):
    """A checkpoint written before the record existed: the leaves' shapes and dtypes are still checked (orbax
    would have cast float16 scales to float32 silently), and a warning says the schemes cannot be verified."""
    d = _edited(converted, tmp_path, _set(key, value), legacy=True)
    with caplog.at_level(logging.WARNING, logger="afpq_jax"), pytest.raises(CheckpointError, match=message):
        aq.load(d)
    assert "cannot be verified" in caplog.text
    assert aq.load(_edited(converted, tmp_path / "plain", lambda qc: None, legacy=True)) is not None


@pytest.mark.parametrize("name,text,message", [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json must be a JSON object, got an array"),
    (checkpoint.QUANT_CONFIG, '{"checkpoint_format": "afpq-jax/1"}', "'layers' must be an object"),
    (checkpoint.QUANT_CONFIG, '{"checkpoint_format": "afpq-jax/1", "layers": [1]}', "'layers' must be an object"),
    (checkpoint.QUANT_CONFIG, '{"checkpoint_format": "afpq-jax/1", "layers": {}, "dtype": "int8"}',
     "'dtype' must be one of float32, bfloat16, float16, got 'int8'"),
    (checkpoint.QUANT_CONFIG, b"\xff\xfe{", "is not UTF-8 text"),
])
def test_damaged_json_files_are_one_line_errors(converted, tmp_path, capsys, name, text, message):
    d = tmp_path / "damaged"
    shutil.copytree(converted, d)
    (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    rc = eval_cli.main(["--model", str(d), "--no-ppl", "--prompt", "x", "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_an_unedited_checkpoint_loads_and_is_what_was_saved(converted):
    model = aq.load(converted)
    assert model.linear_layers()[LAYER].scheme == aq.QuantScheme.create("nf3", group_size=32)
    assert model.linear_layers()["layers.1.mlp.up_proj"].scheme == aq.QuantScheme.create("int4", group_size=16)
