"""The real SmolLM2-135M (LLaMA architecture, GGUF from PyPI) through our loaders and model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax._src.evaluation import perplexity
from tests.test_assets import _numpy_llama_nll

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.")


@pytest.fixture(scope="module")
def float_model(real_hf_dir):
    return aq.load(real_hf_dir)


@pytest.mark.slow
def test_jax_model_matches_a_plain_numpy_forward(real_hf_dir, float_model):
    from safetensors.numpy import load_file
    ids = np.asarray(aq.load_tokenizer(real_hf_dir)(TEXT)["input_ids"])
    cfg = json.loads((real_hf_dir / "config.json").read_text())
    ref_nll = _numpy_llama_nll(load_file(real_hf_dir / "model.safetensors"), cfg, ids)
    got = perplexity(float_model, ids, seq_len=len(ids), progress=False)
    assert got["nll"] == pytest.approx(ref_nll, rel=1e-4)
    assert got["perplexity"] < 20


@pytest.mark.slow
def test_gguf_and_hf_directory_give_the_same_model(real_gguf, float_model):
    ids = jnp.asarray(np.arange(100, 132, dtype=np.int32)[None])
    np.testing.assert_allclose(np.asarray(aq.load(real_gguf)(ids)), np.asarray(float_model(ids)), atol=2e-5)


@pytest.mark.slow
def test_converted_smollm2_loads_runs_and_is_close_to_float(real_hf_dir, float_model, tmp_path):
    from afpq_jax import convert as convert_cli
    out = tmp_path / "nf4"
    assert convert_cli.main(["--model", str(real_hf_dir), "--out", str(out), "--format", "nf4",
                             "--no-progress"]) == 0
    q = aq.load(out)
    ids = np.asarray(aq.load_tokenizer(out)(TEXT)["input_ids"])
    ppl_q = perplexity(q, ids, seq_len=len(ids), progress=False)["perplexity"]
    ppl_f = perplexity(float_model, ids, seq_len=len(ids), progress=False)["perplexity"]
    assert ppl_f < ppl_q < 2 * ppl_f  # measured: 8.39 float -> 13.31 NF4-asym g128 RTN
