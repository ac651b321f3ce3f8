"""Resumable conversion: a conversion killed after a block continues from its saved progress and writes the same
checkpoint as an uninterrupted run; nothing appears at --out before the end; another conversion's progress is
refused."""

from __future__ import annotations

import json
import os
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

FIXTURES = Path(__file__).parent / "fixtures"


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
