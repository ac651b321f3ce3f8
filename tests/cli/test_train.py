"""`python -m afpq_jax.train`: a packed checkpoint from QAT, flags and one-line errors."""

from __future__ import annotations

import json

import pytest

import afpq_jax as aq
from tests.support import tool_error
from tests.support import FIXTURES


def test_train_cli_writes_a_loadable_packed_checkpoint(tmp_path, capsys):
    from afpq_jax import train as train_cli
    out = tmp_path / "qat"
    argv = ["--model", str(FIXTURES / "llama_gqa"), "--format", "int2", "--group-size", "32", "--steps", "3",
            "--batch-size", "2", "--lr", "1e-3", "--samples", "4", "--prompt-len", "2", "--new-tokens", "6",
            "--calib-random", "--calib-samples", "2", "--calib-seqlen", "8", "--data-cache", str(tmp_path / "cache"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3", "--history",
            str(tmp_path / "h.jsonl"), "--out", str(out), "--no-progress"]
    assert train_cli.main(argv) == 0, capsys.readouterr().err
    qc = json.loads((out / "quantization_config.json").read_text())
    assert qc["method"] == "qat" and qc["training"]["steps"] == 3 and qc["data"]["kind"] == "self-generated"
    assert all(v["format"] == "int2" for v in qc["layers"].values())
    model = aq.load(out)
    assert all(m.is_quantized for p, m in model.linear_layers().items() if p != "lm_head")
    assert len((tmp_path / "h.jsonl").read_text().splitlines()) == 3
    # the same run resumed from its finished checkpoint with more steps trains on, into a new output
    assert train_cli.main([*argv[:-3], "--steps", "4", "--resume", "--out", str(tmp_path / "qat2"),
                           "--no-progress"]) == 0
    assert json.loads((tmp_path / "qat2" / "quantization_config.json").read_text())["training"]["steps"] == 4


@pytest.mark.parametrize("extra,message", [
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--gamma", "1.5"], "gamma"),
    (["--format", "nf4", "--rules", "r.json"], "--rules replaces"),
])
def test_train_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    from afpq_jax import train as train_cli
    out = tmp_path / "out"
    rc = train_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--calib-random", "--out", str(out),
                         "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_train_resume_of_a_missing_directory_creates_nothing(tmp_path, capsys):
    ckpt = tmp_path / "newdir"
    # options small enough that a run would get as far as the trainer (which creates the directory it is given)
    line = tool_error(capsys, "train", ["--model", str(FIXTURES / "llama_gqa"), "--calib-random", "--calib-samples",
                                         "2", "--calib-seqlen", "8", "--samples", "2", "--prompt-len", "2",
                                         "--new-tokens", "6", "--data-cache", str(tmp_path / "cache"), "--resume",
                                         "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "o"),
                                         "--no-progress"])
    assert "nothing to resume" in line and str(ckpt) in line
    assert not ckpt.exists() and not (tmp_path / "o").exists()


def test_train_loss_summary_is_honest_for_short_runs():
    from afpq_jax.train import loss_summary
    assert loss_summary([3.0]) == "loss 3.0000 (1 step)"
    assert loss_summary([3.0, 2.0, 1.0]) == "loss 3.0000 (step 1) -> 1.0000 (step 3)"
    assert loss_summary([float(i) for i in range(10, 0, -1)]) == "loss 8.0000 (first 5) -> 3.0000 (last 5)"
