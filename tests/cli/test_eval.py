"""`python -m afpq_jax.eval`: scoring a converted model, flags and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import eval as eval_cli
from afpq_jax import convert as convert_cli
from afpq_jax._src.evaluation import perplexity
from tests.support import FIXTURES, tiny_hf_weights, write_tiny_llama, tool_error


def test_gguf_model_converts_with_its_tokenizer_and_evaluates(tmp_path, capsys):
    weights = tiny_hf_weights(np.random.default_rng(3), tied=True)
    src = write_tiny_llama(tmp_path / "tiny.gguf", weights)
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(src), "--out", str(out), "--format", "fp3", "--group-size", "16",
                             "--no-progress"]) == 0
    assert (out / "tokenizer.json").exists()
    tok = aq.load_tokenizer(out)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["hello world"] * 200))
    capsys.readouterr()
    assert eval_cli.main(["--model", str(out), "--text", str(text), "--seq-len", "16", "--json", "--no-progress",
                          "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert res["windows"] == len(ids) // 16 and isinstance(res["generation"], str)
    assert res["perplexity"] == pytest.approx(perplexity(aq.load(out), ids, seq_len=16, progress=False)["perplexity"])


def test_coordinator_auto_outside_a_cluster_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "CLOUD_TPU"))}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.eval", "--model", str(FIXTURES / "llama_gqa"), "--no-ppl",
                        "--coordinator", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --coordinator auto found no cluster (SLURM, TPU pod, Open MPI); pass --coordinator HOST:PORT "
        "--num-processes N --process-id I")


def test_eval_cli_rejects_bad_sampling_options_before_loading(capsys):
    rc = eval_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--no-ppl", "--prompt", "hi", "--top-p", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "top_p" in err and "Traceback" not in err


def test_distributed_flags_are_checked(capsys):
    from afpq_jax import eval as eval_cli
    rc = eval_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--no-ppl", "--num-processes", "2"])
    assert rc == 2 and "need --coordinator" in capsys.readouterr().err
    rc = eval_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--no-ppl", "--coordinator", "127.0.0.1:1",
                        "--num-processes", "2", "--process-id", "2"])
    assert rc == 2 and "not in [0, 2)" in capsys.readouterr().err


def test_a_mesh_that_does_not_fit_the_devices_is_one_line(capsys):
    line = tool_error(capsys, "eval", ["--model", str(FIXTURES / "llama_gqa"), "--mesh", "model=3", "--no-ppl"])
    assert "--mesh model=3 needs 3 devices, 1 are visible; make the sizes multiply to 1" in line
