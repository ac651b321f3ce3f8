"""GPTQ, AWQ, the clipping search and the block-by-block calibration pipeline."""

import gc
import json
import tracemalloc
import weakref
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.algorithms import awq
from afpq_jax._src.algorithms.clip import clip_search, group_output_error
from afpq_jax._src.algorithms.gptq import accumulate_hessian, gptq_quantize, hessian_inverse_factor, output_mse
from afpq_jax._src.calibration import driver, taps
from afpq_jax._src.calibration.data import sample_windows
from afpq_jax._src.io.sources import Source, open_source
from afpq_jax._src.layers import record_inputs
from afpq_jax._src.loading import CheckpointWeights, load_float
from afpq_jax._src.models import config_from_hf, linear_paths
from afpq_jax._src.models.transformer import block_linears
from tests import reference as ref

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = ["int3", "nf3", "fp3_e2m0", "int4", "nf4", "fp4_e2m1"]


def _correlated_inputs(k, t, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, k)) @ rng.standard_normal((k, k)) * 0.2 + rng.standard_normal(k)).astype(
        np.float32)


# g16 in 32-row blocks: two 16-row sub-blocks per block; g64 (K = 128): 64-row blocks of two 32-row sub-blocks
# that share their group's parameters; g37 in 111-row blocks (block_size 128): no small divisor, one sub-block
# per group, each taking its own parameters.
@pytest.mark.parametrize("fmt,asym,g,k,block", [("nf3", True, 16, 64, 32), ("int3", True, 32, 64, 32),
                                                ("fp3_e2m0", True, 16, 64, 32), ("int4", False, 16, 64, 32),
                                                ("nf4", False, 32, 64, 32), ("nf3", True, 64, 128, 32),
                                                ("int4", True, 37, 111, 128)])
def test_gptq_matches_numpy_reference(fmt, asym, g, k, block):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (k, 12)) * 0.05).astype(np.float32)
    x = _correlated_inputs(k, 512, 1)
    h, _ = accumulate_hessian(None, jnp.asarray(x), 0)
    got = np.asarray(aq.dequantize(gptq_quantize(w, h, fmt, group_size=g, asym=asym, block_size=block)), np.float64)
    want = ref.ref_gptq(w, np.asarray(h, np.float64), fmt, g, asym, block=block)
    # float32 vs float64 error propagation can flip a rare near-tie and everything downstream of it in that row
    rows_equal = np.mean(np.all(np.isclose(got, want, rtol=1e-4, atol=1e-6), axis=0))
    assert rows_equal >= 0.75, rows_equal
    assert output_mse(w, got, x) == pytest.approx(output_mse(w, want, x), rel=0.05)


@pytest.mark.parametrize("k,damp", [(7, 0.0), (96, 0.01), (300, 0.01)])
def test_hessian_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(k, damp):
    """Against float64 numpy done AutoGPTQ's way (invert, then factor): the same triangle, to float32 accuracy
    scaled by H's condition number."""
    x = _correlated_inputs(k, 4 * k, 5)
    h = (x.T.astype(np.float64) @ x) * (2.0 / len(x))
    got = np.asarray(hessian_inverse_factor(jnp.asarray(h, jnp.float32), damp), np.float64)
    damped = h + damp * np.mean(np.diag(h)) * np.eye(k)
    want = np.linalg.cholesky(np.linalg.inv(damped)).T
    assert np.all(np.tril(got, -1) == 0) and np.all(np.diag(got) > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-8 * np.linalg.cond(damped) * np.abs(want).max())


# Each new (format, scheme, group, shape) compiles (~1 s): 20 examples, not the profile's 40, keep the suite short.
@settings(max_examples=20)
@given(fmt=st.sampled_from(FORMATS), asym=st.booleans(), g=st.sampled_from([None, 8, 32, 128]),
       k=st.sampled_from([8, 45, 100]), seed=st.integers(0, 1000))  # few shapes: each new shape compiles
def test_gptq_with_diagonal_hessian_is_rtn(fmt, asym, g, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, 5)) * 0.1).astype(np.float32)
    h = jnp.diag(jnp.asarray(rng.uniform(0.1, 3.0, k), jnp.float32))
    qt = gptq_quantize(w, h, fmt, group_size=g, asym=asym, block_size=32)
    qt.validate()
    np.testing.assert_array_equal(aq.dequantize(qt), aq.fake_quant(w, fmt, group_size=g, asym=asym))


def test_gptq_and_clip_search_check_their_inputs():
    w = np.ones((16, 4), np.float32)
    h = jnp.eye(16)
    with_nan = w.copy()
    with_nan[0, 0] = np.nan
    for kwargs, exc, msg in [({"group_size": 0}, aq.InputError, "group_size"),
                             ({"block_size": 0}, aq.InputError, "block_size"),
                             ({"damp": -1.0}, aq.InputError, "damp"),
                             ({"scale_dtype": "int8"}, aq.InputError, "scale_dtype"),
                             ({"kernel": with_nan}, aq.InputError, "NaN/inf"),
                             ({"kernel": w[None]}, aq.InputError, "2-D kernel"),
                             ({"kernel": w.astype(np.int32)}, TypeError, "not floating point")]:
        kernel = kwargs.pop("kernel", w)
        with pytest.raises(exc, match=msg):
            gptq_quantize(kernel, h, "nf4", **{"group_size": 8, **kwargs})
    with pytest.raises(aq.InputError, match="100 features, the kernel expects 16"):
        clip_search(w, np.ones((32, 100), np.float32), "nf4", group_size=8)
    with pytest.raises(aq.InputError, match="group_size"):
        clip_search(w, np.ones((32, 16), np.float32), "nf4", group_size=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, (96, 32)) * 0.05).astype(np.float32)
    x = _correlated_inputs(96, 2048, 3)
    h, _ = accumulate_hessian(None, jnp.asarray(x), 0)
    for fmt in ["int3", "nf3", "fp3"]:
        qt = gptq_quantize(w, h, fmt, group_size=32, act_order=act_order)
        qt.validate()
        assert output_mse(w, aq.dequantize(qt), x) < 0.8 * output_mse(w, aq.fake_quant(w, fmt, group_size=32), x)


def test_hessian_accumulation_is_a_running_mean():
    x = _correlated_inputs(16, 300, 4)
    h, n = None, 0
    for part in np.array_split(x, 7):
        h, n = accumulate_hessian(h, jnp.asarray(part), n)
    np.testing.assert_allclose(h, 2 * x.T.astype(np.float64) @ x / len(x), rtol=1e-4, atol=1e-4)


@settings(max_examples=20)  # as above: each new (format, scheme, group) compiles
@given(fmt=st.sampled_from(FORMATS), asym=st.booleans(), g=st.sampled_from([None, 16, 64]),
       seed=st.integers(0, 1000))
def test_clip_search_never_increases_its_error(fmt, asym, g, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (80, 6)) * 0.05).astype(np.float32)
    x = rng.standard_normal((64, 80)).astype(np.float32)
    ratios, err = clip_search(w, x, fmt, group_size=g, asym=asym)
    qt = aq.quantize(w, fmt, group_size=g, asym=asym, clip_ratios=ratios)
    clipped = group_output_error(w, aq.dequantize(qt), x, g)
    plain = group_output_error(w, aq.fake_quant(w, fmt, group_size=g, asym=asym), x, g)
    assert np.all(clipped <= plain * (1 + 1e-5) + 1e-12)
    np.testing.assert_allclose(np.asarray(err), clipped, rtol=1e-3, atol=1e-9)
    r_neg, r_pos = (np.asarray(r) for r in ratios)
    assert np.all((r_neg >= 0.55 - 1e-6) & (r_neg <= 1)) and np.all((r_pos >= 0.55 - 1e-6) & (r_pos <= 1))
    if not asym:
        np.testing.assert_array_equal(r_neg, r_pos)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("asym", [True, False])
def test_clip_search_finds_the_grid_minimum(fmt, asym):
    """Exhaustive float64 numpy search over the same grid (the separable AFPQ path must find the same minimum)."""
    rng = np.random.default_rng(3)
    k, n, g, t = 96, 40, 32, 48
    w = (rng.standard_t(3, (k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    (r_neg, r_pos), err = clip_search(w, x, fmt, group_size=g, asym=asym)
    grid = 1.0 - 0.05 * np.arange(10)
    pairs = [(a, b) for a in grid for b in grid] if asym else [(a, a) for a in grid]
    best = np.full((k // g, n), np.inf)
    for a, b in pairs:
        for gi in range(k // g):
            rows = w[gi * g:(gi + 1) * g]
            lo, hi = rows.min(0) * np.float32(a), rows.max(0) * np.float32(b)
            dq, _, _ = ref.ref_round(rows, ref.ref_params(lo, hi, fmt, asym), fmt)
            e = x[:, gi * g:(gi + 1) * g].astype(np.float64) @ (rows - dq).astype(np.float64)
            best[gi] = np.minimum(best[gi], np.mean(e * e, axis=0))
    np.testing.assert_allclose(np.asarray(err), best, rtol=2e-3, atol=1e-9)
    qt = aq.quantize(w, fmt, group_size=g, asym=asym, clip_ratios=(r_neg, r_pos))
    np.testing.assert_allclose(group_output_error(w, aq.dequantize(qt), x, g), best, rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize("fixture", ["llama_tied_theta", "llama_gqa", "bloom"])
def test_awq_scale_folding_keeps_float_logits(fixture):
    src = open_source(FIXTURES / fixture)
    cfg = config_from_hf(src.config)
    if cfg.mlp == "gelu":
        import dataclasses
        cfg = dataclasses.replace(cfg, mlp_act_scale=True)
    model = load_float(CheckpointWeights(src, cfg), cfg)
    ref_npz = np.load(FIXTURES / fixture / "reference.npz")
    rng = np.random.default_rng(0)
    groups = awq.scaling_groups(cfg)
    assert len(groups) == (4 if cfg.num_kv_heads == cfg.num_heads and not cfg.fused_qkv else 3)
    for layer in model.layers:
        for group in groups:
            n_in = awq.get_path(layer, group.layers[0]).in_features
            awq.fold_scale(layer, group, jnp.asarray(rng.uniform(0.25, 4.0, n_in), jnp.float32))
    logits = np.asarray(model(jnp.asarray(ref_npz["input_ids"])))
    np.testing.assert_allclose(logits, ref_npz["logits"], atol=1e-4)


def test_awq_search_includes_rtn_and_prefers_it_only_if_nothing_is_better():
    model = aq.load(FIXTURES / "llama_tied_theta")
    cfg = model.cfg
    block = model.layers[0]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    h = block.post_attn_norm(x)
    group = [g for g in awq.scaling_groups(cfg) if g.inspect == "mlp"][0]
    x_mean = jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0)
    s, alpha, losses = awq.search_scale(block, group, h, pos, x_mean, QuantScheme.create("int3", group_size=32))
    assert losses[0] >= losses.min() and alpha == pytest.approx(np.argmin(losses) / 20)
    assert s.shape == (cfg.hidden_size,) and np.all(np.isfinite(np.asarray(s)))


def _calib(vocab, n=6, seqlen=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n, seqlen)).astype(np.int32)


def _calibration(vocab, n=6, seqlen=24, **kw):
    return aq.Calibration(token_ids=_calib(vocab, n, seqlen), batch_size=4, search_samples=4, **kw)


@pytest.mark.parametrize("method,clip", [("gptq", False), ("awq", True), ("awq", False), ("rtn", True)])
def test_blockwise_methods_produce_loadable_models(method, clip):
    cfg = config_from_hf(open_source(FIXTURES / "llama_gqa").config)
    scheme = QuantScheme.create("nf3", group_size=32)
    m = aq.calibration.get_method(method)
    if clip:
        m = aq.calibration.get_method(m, clip=aq.ClipSearch(tokens=64))
    model = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, method=m, clip=clip,
                                   calibration=_calibration(cfg.vocab_size), progress=False)
    assert all(model.linear_layers()[p].is_quantized for p in linear_paths(cfg) if p != "lm_head")
    ids = jnp.asarray(np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"])
    logits = np.asarray(model(ids))
    info = model.checkpoint_info
    assert np.all(np.isfinite(logits)) and dict(info.phase_seconds)["total"] > 0
    record = json.loads(info.quantization)
    assert record["clip"] == clip and (record["method_options"].get("clip") or {}).get("tokens", 64) == 64
    if method == "awq":
        assert set(record["report"]["0"]["awq_alpha"]) == {"attn.q_proj", "mlp.gate_proj", "mlp.down_proj"}


def test_sampled_inputs_equal_full_capture():
    """The clip search's row-sampled capture is the full capture indexed by the rows, in the rows' order."""
    src = open_source(FIXTURES / "llama_gqa")
    cfg = config_from_hf(src.config)
    block = CheckpointWeights(src, cfg).block(0, cfg, jnp.float32)
    x = np.random.default_rng(0).standard_normal((5, 12, cfg.hidden_size)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    rng = np.random.default_rng(1)
    rows = {"attn.v_proj": rng.choice(60, 17, replace=False), "mlp.down_proj": rng.choice(60, 9, replace=False),
            "mlp.up_proj": np.array([59, 0, 13])}
    full = {name: taps.layer_input(block, x, positions, 2, name) for name in rows}
    sampled = taps.sampled_inputs(block, x, positions, 2, rows)
    assert set(sampled) == set(rows)
    for name, idx in rows.items():
        np.testing.assert_array_equal(sampled[name], full[name].reshape(-1, full[name].shape[-1])[idx])


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


def test_convert_cli_gptq_and_awq_record_their_recipe(tmp_path):
    from afpq_jax import convert as convert_cli
    for method in ["gptq", "awq"]:
        out = tmp_path / method
        assert convert_cli.main(["--model", str(FIXTURES / "bloom"), "--out", str(out), "--method", method,
                                 "--format", "int3", "--group-size", "32", "--calib-random", "--calib-samples", "4",
                                 "--calib-seqlen", "16", "--no-progress"]) == 0
        qc = json.loads((out / "quantization_config.json").read_text())
        assert qc["method"] == method and qc["calibration"]["samples"] == 4 and qc["clip"] == (method == "awq")
        assert qc["mlp_act_scale"] == (method == "awq")
        model = aq.load(out)
        ids = jnp.asarray(np.load(FIXTURES / "bloom" / "reference.npz")["input_ids"])
        assert np.all(np.isfinite(np.asarray(model(ids))))


def test_bad_calibration_options(tmp_path, capsys):
    from afpq_jax import convert as convert_cli
    base = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o"), "--calib-random"]
    assert convert_cli.main(base + ["--method", "gptq", "--clip"]) == 2
    assert "clipping search does not apply to method 'gptq'" in capsys.readouterr().err
    assert convert_cli.main(base + ["--method", "gptq", "--calib-samples", "0"]) == 2
    assert "--calib-samples: must be a positive integer" in capsys.readouterr().err
    assert convert_cli.main(base + ["--method", "awq", "--act-order"]) == 2
    assert "--act-order applies to --method gptq" in capsys.readouterr().err
    with pytest.raises(aq.InputError, match="not more than the sequence length"):
        sample_windows(np.arange(10), 4, 10)


# ---- the real model: SmolLM2 layers with real calibration activations (slow) ------------------------------

@pytest.fixture(scope="module")
def smollm2_block_inputs(real_hf_dir, real_text):
    model = aq.load(real_hf_dir)
    tok = aq.load_tokenizer(real_hf_dir)
    ids = sample_windows(tok(real_text[0][:400_000], add_special_tokens=False)["input_ids"], 16, 256)
    x = model.embed_inputs(jnp.asarray(ids))
    pos = jnp.broadcast_to(jnp.arange(256), ids.shape)
    for layer in model.layers[:3]:  # block 3 sees real, non-trivial activations
        x, _ = layer(x, pos)
    block = model.layers[3]
    with record_inputs() as taps:
        block(x, pos)
    names = {id(m): n for n, m in block_linears(block).items()}
    return block, x, pos, {names[id(m)]: np.asarray(inp).reshape(-1, inp.shape[-1]) for m, inp in taps}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int3", "nf3", "fp3_e2m0"])
def test_real_layer_gptq_and_awq_beat_rtn(smollm2_block_inputs, fmt):
    block, x, pos, inputs = smollm2_block_inputs
    scheme = QuantScheme.create(fmt, group_size=128)
    # GPTQ on the real o_proj and down_proj with their real inputs (4096 tokens), on the objective it minimises.
    # (Measured: 0.32-0.38x RTN's MSE. With so few tokens it does not generalise to held-out tokens for
    # K=1536 — real runs use 128 x 2048 tokens.)
    for name in ["attn.o_proj", "mlp.down_proj"]:
        w = block_linears(block)[name].kernel.get_value()
        xin = inputs[name]
        h, _ = accumulate_hessian(None, jnp.asarray(xin), 0)
        gptq = aq.dequantize(gptq_quantize(w, h, fmt, group_size=128))
        rtn = aq.fake_quant(w, fmt, group_size=128)
        assert output_mse(w, gptq, xin) < 0.6 * output_mse(w, rtn, xin), (name, fmt)
    # AWQ on the real MLP group: the chosen scale's output MSE is below RTN's (alpha = 0)
    group = [g for g in awq.scaling_groups(block.attn.cfg) if g.inspect == "mlp"][0]
    h = block.post_attn_norm(x + block.attn(block.input_norm(x), pos, None, 0)[0])
    x_mean = jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0)
    _, alpha, losses = awq.search_scale(block, group, h, pos, x_mean, scheme)
    assert losses.min() < losses[0], (fmt, losses)


def test_calibrated_rtn_equals_streaming_rtn_and_per_kernel_quantize():
    """RTN through the calibrated path (a one-point clip grid: ratios 1) equals streaming RTN and quantizing each
    float kernel on its own, bit for bit."""
    src = open_source(FIXTURES / "bloom")
    cfg = config_from_hf(src.config)
    scheme = QuantScheme.create("fp3", group_size=16)
    rules = [aq.QuantRule(".*", scheme)]
    calibrated = aq.quantize_pretrained(FIXTURES / "bloom", rules, method=aq.RTN(clip=aq.ClipSearch(steps=1)),
                                        calibration=_calibration(cfg.vocab_size, 4, 16), progress=False)
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
