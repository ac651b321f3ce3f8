"""Resumable conversion: saved progress, --resume, and refusing another conversion's or model's progress."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax._src.calibration.progress import CRASH_HOOK
from tests.support import FIXTURES


def _args(out: Path, method: str, *extra: str) -> list[str]:
    return ["--model", str(FIXTURES / "llama_gqa"), "--format", "nf3", "--group-size", "16", "--method", method,
            "--calib-random", "--calib-samples", "4", "--calib-seqlen", "16", "--out", str(out), "--no-progress",
            *extra]


def _state(path: Path) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(aq.load(path)))}


@pytest.mark.parametrize("method", ["awq"])  # AWQ + clip: random row sampling, so the saved rng state matters
def test_killed_conversion_resumes_to_the_uninterrupted_checkpoint(tmp_path, method, capsys):
    out = tmp_path / "q"
    progress = tmp_path / ".q.progress"
    env = {**os.environ, CRASH_HOOK: "0", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", *_args(out, method, "--save-progress")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]  # killed right after block 0 was saved
    assert not out.exists() and (progress / "block_0000.npz").exists()
    assert json.loads((progress / "progress.json").read_text())["done"] == 0
    assert convert_cli.main(_args(out, method, "--resume")) == 0, capsys.readouterr().err
    assert not progress.exists()
    whole = tmp_path / "whole"
    assert convert_cli.main(_args(whole, method)) == 0
    a, b = _state(out), _state(whole)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    qa, qb = (json.loads((d / "quantization_config.json").read_text()) for d in (out, whole))
    assert qa == qb


def test_resume_refuses_another_conversions_progress_and_needs_progress(tmp_path, capsys):
    out = tmp_path / "q"
    rc = convert_cli.main(_args(out, "gptq", "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to resume" in err and "Traceback" not in err
    env = {**os.environ, CRASH_HOOK: "0", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", *_args(out, "gptq", "--save-progress")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    rc = convert_cli.main(_args(out, "gptq", "--resume", "--damp", "0.05"))
    err = capsys.readouterr().err
    assert rc == 2 and "progress of a different conversion" in err and not out.exists()
    assert (tmp_path / ".q.progress" / "progress.json").exists()  # left as it was


def test_rtn_streaming_saves_progress_without_activations(tmp_path):
    scheme = aq.QuantScheme.create("int4", group_size=16)
    a = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, progress_dir=tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "progress.json").read_text())
    assert saved["done"] == 1 and not saved["activations"] and not (tmp_path / "p" / "activations.npy").exists()
    # resuming a finished run only assembles the saved blocks: the same model
    b = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, progress_dir=tmp_path / "p",
                               resume=True)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(aq.InputError, match="needs progress_dir"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, progress=False, resume=True)


def _with_changed_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of the model ``src`` with one value of tensor ``name`` changed: the same architecture, other weights."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 0.01
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_resume_refuses_the_progress_of_another_models_weights(tmp_path, capsys):
    """Was: progress saved from model A, --resume with model B of the same architecture -> exit 0, the first
    blocks from A and the rest from B (the fingerprint covered config, layout and options, not the weights)."""
    a = FIXTURES / "llama_gqa"
    progress = tmp_path / ".q.progress"
    scheme = aq.QuantScheme.create("nf3", group_size=16)
    aq.quantize_pretrained(a, scheme, progress=False, progress_dir=progress)  # every block saved, kept
    saved = {p.name: p.read_bytes() for p in progress.iterdir()}
    cli = ["--format", "nf3", "--group-size", "16", "--out", str(tmp_path / "q"), "--resume", "--no-progress"]
    for tensor, what in [("model.layers.0.mlp.up_proj.weight", "weights of block 0"),
                         ("model.embed_tokens.weight", "embeddings / output layers"),
                         ("lm_head.weight", "embeddings / output layers")]:
        b = _with_changed_tensor(a, tmp_path / tensor, tensor)
        with pytest.raises(aq.CheckpointError, match=f"model's {what} differ from those of the interrupted"):
            aq.quantize_pretrained(b, scheme, progress=False, progress_dir=progress, resume=True)
        assert convert_cli.main(["--model", str(b), *cli]) == 2
        assert f"the model's {what} differ" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in progress.iterdir()} == saved and not (tmp_path / "q").exists()
    same = tmp_path / "copy"
    shutil.copytree(a, same)  # the same weights elsewhere: resumes
    assert convert_cli.main(["--model", str(same), *cli]) == 0 and not progress.exists()


def test_starting_over_never_deletes_what_progress_did_not_write(tmp_path):
    from afpq_jax._src.calibration.progress import BlockProgress
    d = tmp_path / ".q.progress"
    d.mkdir()
    (d / "block_0000.npz").write_bytes(b"old")
    (d / "thesis.tex").write_text("mine")
    with pytest.raises(aq.OutputError, match="holds thesis.tex, which a conversion's progress never does"):
        BlockProgress(d, "fingerprint").start_over()
    assert sorted(p.name for p in d.iterdir()) == ["block_0000.npz", "thesis.tex"]


def test_saving_progress_again_never_deletes_an_interrupted_conversions_progress(tmp_path, capsys):
    """The same --save-progress command without --resume silently deleted the saved blocks."""
    progress = tmp_path / ".q.progress"
    aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("nf3", group_size=16), progress=False,
                           progress_dir=progress)
    saved = {p.name: p.read_bytes() for p in progress.iterdir()}
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--format", "nf3", "--group-size", "16",
                             "--out", str(tmp_path / "q"), "--save-progress", "--no-progress"]) == 2
    assert "pass --resume to continue it, or delete that directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in progress.iterdir()} == saved
    state = json.loads((progress / "progress.json").read_text())
    del state["source_outer"]  # as an afpq-jax before the weight digests wrote it
    (progress / "progress.json").write_text(json.dumps(state))
    with pytest.raises(aq.CheckpointError, match="saved by an older afpq-jax, without digests"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("nf3", group_size=16), progress=False,
                               progress_dir=progress, resume=True)
