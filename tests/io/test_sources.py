"""Float checkpoint sources and untrusted model files: config.json, shard indexes, slices, one-line errors through
the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.io.sources import open_source
from tests.support import read_safetensors_header, write_safetensors
from tests.support import FIXTURES, copy_fixture, fixture_config


def _cli_error(capsys, model: Path, tmp_path: Path) -> str:
    """The one ``error:`` line of a failed in-process ``convert --method rtn`` (exit status 2, no traceback)."""
    rc = convert_cli.main(["--model", str(model), "--out", str(tmp_path / "out"), "--method", "rtn",
                           "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]  # the plan ("converting ...") precedes it
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (rc, err)
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_sharded_index_with_missing_shard_is_reported(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_sharded", d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing shard"):
        aq.load(d)


def test_safetensors_slices_equal_the_whole_tensor(tmp_path):
    from afpq_jax._src.io import sources
    src = sources.open_source(FIXTURES / "llama_gqa")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        full = src.read(name)
        assert src.describe(name) == (full.dtype, full.shape)
        for index in [tuple(slice(0, d) for d in full.shape), tuple(slice(d // 3, d - 1) for d in full.shape),
                      (slice(1, 2),) + tuple(slice(None) for _ in full.shape[1:])]:
            np.testing.assert_array_equal(src.read_slice(name, index), full[index])


def test_hub_id_without_network_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; fail fast instead of timing out
    from afpq_jax import CheckpointError
    from afpq_jax._src.io.sources import open_source
    with pytest.raises(CheckpointError, match="without network access pass a local directory"):
        open_source("HuggingFaceTB/SmolLM2-135M-Instruct")


# ---- config.json and the shard index must be JSON objects ---------------------------------------------------

@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "5", "null"])
def test_config_json_that_is_not_an_object(tmp_path, text):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json must be a JSON object"):
        open_source(d)


def test_config_json_that_is_not_utf8(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config\.json is not UTF-8"):
        open_source(d)


@pytest.mark.parametrize("index,message", [
    ("[1]", r"model\.safetensors\.index\.json must be a JSON object"),
    ('{"weight_map": {"model.norm.weight": 5}}', r"weight_map must map tensor names to shard file names"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}',
     r"shard file names in the model's directory, got '\.\./elsewhere"),
])
def test_bad_shard_index(tmp_path, index, message):
    d = copy_fixture(tmp_path, "llama_sharded")
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        open_source(d)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    # the reader used the last shard's copy: weights silently mixed from two files
    d = copy_fixture(tmp_path)
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(d / "extra.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "extra.safetensors", "lm_head.weight": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is in both .*extra\.safetensors and "
                                              r".*model\.safetensors; remove the file"):
        open_source(d)


# ---- the CLI: one "error:" line naming the field, exit status 2 ------------------------------------------------

def test_cli_string_eps_is_one_line(tmp_path, capsys):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_text(json.dumps(fixture_config(rms_norm_eps="1e-5")))
    line = _cli_error(capsys, d, tmp_path)
    assert "config.json: rms_norm_eps must be a positive finite number, got '1e-5' (a string)" in line


def test_cli_config_list_is_one_line(tmp_path, capsys):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_text("[1, 2]")
    assert "config.json must be a JSON object" in _cli_error(capsys, d, tmp_path)


def test_cli_overlapping_safetensors_offsets_is_one_line(tmp_path, capsys):
    d = copy_fixture(tmp_path)
    st = d / "model.safetensors"
    header, data = read_safetensors_header(st)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"  # both 64 x 64
    header[q] = {**header[q], "data_offsets": header[o]["data_offsets"]}
    write_safetensors(st, header, data)
    line = _cli_error(capsys, d, tmp_path)
    assert f"model.safetensors: tensor '{q}' overlaps tensor '{o}'" in line
