"""`quantize_pretrained` and `save`: the same checkpoint as the CLI, in-memory models, calibration data required."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax import convert as convert_cli
from tests.support import FIXTURES, NF3


def _files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*")
            if f.is_file() and f.relative_to(d).parts[0] != "params"}


def _leaves(model):
    from flax import nnx
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_pretrained_and_save_write_what_the_cli_writes(tmp_path, method):
    src = FIXTURES / "llama_gqa"
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert convert_cli.main(["--model", str(src), "--format", "int3", "--group-size", "32", "--method", method,
                             "--calib-random", "--calib-samples", "4", "--calib-seqlen", "16", "--out",
                             str(cli_out), "--no-progress"]) == 0
    scheme = QuantScheme.create("int3", group_size=32)
    calibration = aq.Calibration(random=True, samples=4, seqlen=16) if method != "rtn" else None
    model = aq.quantize_pretrained(str(src), aq.default_rules(scheme), method=method, calibration=calibration,
                                   progress=False)
    assert aq.save(model, api_out) == api_out.absolute()
    cli_files, api_files = _files(cli_out), _files(api_out)
    assert cli_files.keys() == api_files.keys() and "quantization_config.json" in cli_files
    for name in cli_files:  # config, quantization config, tokenizer files: byte for byte
        assert cli_files[name] == api_files[name], name
    # orbax's data-file split depends on I/O timing; the stored arrays must be identical
    a, b = _leaves(aq.load(cli_out)), _leaves(aq.load(api_out))
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=str(p))


def test_quantize_pretrained_from_an_in_memory_model(tmp_path):
    float_model = aq.load(FIXTURES / "llama_gqa")
    before = _leaves(float_model)
    q_mem = aq.quantize_pretrained(float_model, NF3, progress=False)
    q_path = aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, progress=False)
    after = _leaves(float_model)
    assert all(np.array_equal(before[p], after[p]) for p in before)  # the input model is left unchanged
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    np.testing.assert_array_equal(np.asarray(q_mem(ids)), np.asarray(q_path(ids)))
    aq.save(q_mem, tmp_path / "q")  # the config came along from aq.load
    np.testing.assert_array_equal(np.asarray(aq.load(tmp_path / "q")(ids)), np.asarray(q_path(ids)))
    with pytest.raises(aq.CheckpointError, match="already has quantized layers"):
        aq.quantize_pretrained(q_mem, NF3, progress=False)
    # bfloat16: every kernel, lm_head included, is quantized from its bfloat16 value on both paths (lm_head was
    # quantized from the checkpoint's float32 on the path route: different codes, logits off by 0.2)
    rules = [aq.QuantRule(".*", aq.QuantScheme.create("nf4", group_size=32))]
    q_mem = aq.quantize_pretrained(aq.load(FIXTURES / "llama_gqa", dtype="bfloat16"), rules, progress=False)
    q_path = aq.quantize_pretrained(FIXTURES / "llama_gqa", rules, dtype="bfloat16", progress=False)
    assert q_path.linear_layers()["lm_head"].is_quantized
    for p, layer in q_path.linear_layers().items():
        np.testing.assert_array_equal(layer.quantized_tensor().codes, q_mem.linear_layers()[p].quantized_tensor().codes,
                                      err_msg=p)
    np.testing.assert_array_equal(np.asarray(q_mem(ids), np.float32), np.asarray(q_path(ids), np.float32))


def test_calibrated_methods_need_calibration_data():
    with pytest.raises(aq.InputError, match="needs calibration data"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", progress=False)
    with pytest.raises(aq.InputError, match="exactly one data source"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method="gptq", progress=False,
                               calibration=aq.Calibration(random=True, text="x"))
