"""The block-by-block driver: the methods' loadable models, bounded memory, weight checks, calibrated RTN = streaming
RTN."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tracemalloc
import weakref
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.calibration import driver
from afpq_jax._src.io.sources import Source, open_source
from afpq_jax._src.loading import CheckpointWeights
from afpq_jax._src.models import config_from_hf, linear_paths
from tests.support import FIXTURES, random_calibration

TENSOR = "model.layers.1.mlp.down_proj.weight"


def _with_value(tmp_path: Path, value: float) -> Path:
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama_gqa", d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors[TENSOR] = tensors[TENSOR].copy()
    tensors[TENSOR][3, 5] = value
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_nan_weight_names_its_layer(tmp_path, value):
    model = _with_value(tmp_path, value)
    with pytest.raises(aq.InputError, match=r"layers\.1\.mlp\.down_proj has 1 NaN/inf weights"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16), progress=False)


def test_saturated_float16_scales_are_warned_per_layer(tmp_path, caplog):
    model = _with_value(tmp_path, 1e6)  # int4-asym step (max - min) / 15 > 65504
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16), progress=False)
    warned = [r.getMessage() for r in caplog.records if "saturate" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("layers.1.mlp.down_proj: 1 group scale(s) saturate at "
                                                     "float16's largest value 65504"), warned
    assert "--scale-dtype float32" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16, scale_dtype="float32"),
                               progress=False)
    assert "saturate" not in caplog.text
    # E4M3 under a global scale puts every layer's largest group at 448 by design: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        aq.quantize_pretrained(model, aq.QuantScheme.preset("nvfp4"), progress=False)
    assert "saturate" not in caplog.text


def _calib(vocab, n=4, seqlen=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, seqlen)).astype(np.int32)


@pytest.mark.parametrize("method,clip", [("gptq", False), ("awq", True), ("awq", False), ("rtn", True)])
def test_blockwise_methods_produce_loadable_models(method, clip):
    cfg = config_from_hf(open_source(FIXTURES / "llama_gqa").config)
    scheme = QuantScheme.create("nf3", group_size=32)
    m = aq.calibration.get_method(method)
    if clip:
        m = aq.calibration.get_method(m, clip=aq.ClipSearch(tokens=64))
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, method=m, clip=clip,
                                   calibration=random_calibration(cfg.vocab_size), progress=False)
    assert all(model.linear_layers()[p].is_quantized for p in linear_paths(cfg) if p != "lm_head")
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    logits = np.asarray(model(ids))
    info = model.checkpoint_info
    assert np.all(np.isfinite(logits)) and dict(info.phase_seconds)["total"] > 0
    record = json.loads(info.quantization)
    assert record["clip"] == clip and (record["method_options"].get("clip") or {}).get("tokens", 64) == 64
    if method == "awq":
        assert set(record["report"]["0"]["awq_alpha"]) == {"attn.q_proj", "mlp.gate_proj", "mlp.down_proj"}


def test_blockwise_holds_one_float_block_and_one_activation_buffer(monkeypatch):
    """Bounded memory: never two float blocks alive at once, and host activations stay one buffer."""
    src = open_source(FIXTURES / "llama_gqa")
    cfg = config_from_hf(src.config)
    import dataclasses
    cfg8 = dataclasses.replace(cfg, num_layers=2)
    alive, peak_alive, reads = [], [], []
    real_block, real_read = CheckpointWeights.block, Source.read

    def tracking_block(self, *args, **kw):
        gc.collect()
        peak_alive.append(sum(r() is not None for r in alive))
        block = real_block(self, *args, **kw)
        alive.append(weakref.ref(block))
        return block

    def tracking_read(self, name):
        reads.append(name)
        return real_read(self, name)

    monkeypatch.setattr(CheckpointWeights, "block", tracking_block)
    monkeypatch.setattr(Source, "read", tracking_read)
    n, seqlen = 64, 64
    buffer_bytes = n * seqlen * cfg.hidden_size * 4
    scheme = QuantScheme.create("int4", group_size=32)
    layout = {p: scheme for p in linear_paths(cfg8) if p != "lm_head"}
    calibration = aq.Calibration(token_ids=_calib(cfg.vocab_size, n, seqlen), batch_size=4, search_samples=4)
    calib = calibration.windows(cfg.vocab_size, cfg.max_seq_len)

    def run():
        return driver.run(CheckpointWeights(src, cfg8), cfg8, layout, aq.GPTQ(), calib, calibration, progress=False)

    run()  # compile first
    peak_alive.clear(), reads.clear()
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert max(peak_alive) == 0  # the previous float block is gone before the next is read
    first_block1 = min(i for i, r in enumerate(reads) if r.startswith("model.layers.1."))
    assert all(not r.startswith("model.layers.1.") for r in reads[:first_block1])
    assert all(not r.startswith("model.layers.0.") for r in reads[first_block1:])  # blocks read in order, once
    # all blocks' activations would be num_layers + 1 buffers; we hold one plus minibatch temporaries
    assert peak < 1.5 * buffer_bytes + 500_000, (peak, buffer_bytes)


def test_calibrated_rtn_equals_streaming_rtn_and_per_kernel_quantize():
    """RTN through the calibrated path (a one-point clip grid: ratios 1) equals streaming RTN and quantizing each
    float kernel on its own, bit for bit."""
    src = open_source(FIXTURES / "bloom")
    cfg = config_from_hf(src.config)
    scheme = QuantScheme.create("fp3", group_size=16)
    rules = [aq.QuantRule(".*", scheme)]
    calibrated = aq.quantize_pretrained(FIXTURES / "bloom", rules, method=aq.RTN(clip=aq.ClipSearch(steps=1)),
                                        calibration=random_calibration(cfg.vocab_size), progress=False)
    streamed = aq.quantize_pretrained(FIXTURES / "bloom", rules, progress=False)
    float_model = aq.load(FIXTURES / "bloom")
    for p, layer in float_model.linear_layers().items():
        want = aq.quantize(layer.kernel.get_value(), "fp3", group_size=16)
        for model in (calibrated, streamed):
            got = model.linear_layers()[p].quantized_tensor()
            np.testing.assert_array_equal(got.codes, want.codes)
            np.testing.assert_array_equal(got.scale, want.scale)
    ids = jnp.asarray(np.load(FIXTURES / "bloom" / "reference.npz")["input_ids"])
    np.testing.assert_array_equal(np.asarray(calibrated(ids)), np.asarray(streamed(ids)))
