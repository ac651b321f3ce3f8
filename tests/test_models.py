"""Our Flax NNX LLaMA/BLOOM against PyTorch transformers' logits (fixtures from scripts/make_torch_fixtures.py)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import afpq_jax as aq
from afpq_jax._src.io.gguf import read_gguf_config
from afpq_jax._src.models import config_from_hf
from tests import test_gguf

FIXTURES = Path(__file__).parent / "fixtures"
TORCH_FIXTURES = ["llama_gqa", "llama_tied_theta", "llama3_rope", "llama_sharded", "bloom"]


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_logits_match_pytorch_transformers(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = aq.load(FIXTURES / name)
    logits = model(jnp.asarray(ref["input_ids"]))
    assert logits.dtype == jnp.float32 and logits.shape == ref["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=0, atol=1e-4)


def test_hf_flax_msgpack_weights_match():
    ref = np.load(FIXTURES / "llama_gqa" / "reference.npz")  # same weights, transformers-4 Flax format
    model = aq.load(FIXTURES / "llama_flax")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ref["input_ids"]))), ref["logits"], atol=1e-4)


def test_architecture_features_are_parsed():
    cfg = config_from_hf(json.loads((FIXTURES / "llama3_rope" / "config.json").read_text()))
    assert cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert cfg.num_kv_heads == 1 and cfg.head_dim == 32
    assert config_from_hf(json.loads((FIXTURES / "llama_tied_theta" / "config.json").read_text())).tie_embeddings
    bloom = config_from_hf(json.loads((FIXTURES / "bloom" / "config.json").read_text()))
    assert bloom.position == "alibi" and bloom.fused_qkv and bloom.embed_norm


def test_transformers4_and_5_rope_configs_agree():
    v5 = json.loads((FIXTURES / "llama3_rope" / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    params = dict(v5["rope_parameters"])
    v4["rope_theta"] = params.pop("rope_theta")
    v4["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    assert config_from_hf(v4) == config_from_hf(v5)


@pytest.mark.parametrize("change,msg", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: bloom, llama, mistral"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "only 'silu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_unsupported_configs_are_named(change, msg):
    hf = {**json.loads((FIXTURES / "llama_gqa" / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=msg):
        config_from_hf(hf)


@pytest.mark.parametrize("name", ["llama_gqa", "bloom"])
def test_kv_cache_matches_full_forward(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = aq.load(FIXTURES / name)
    ids = jnp.asarray(ref["input_ids"])
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 4)
    chunks = []
    for start, stop in [(0, 7), (7, 8), (8, ids.shape[1])]:  # prefill, one token, the rest
        logits, cache = model.forward_with_cache(ids[:, start:stop], cache, start)
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), ref["logits"], atol=1e-4)


@pytest.mark.parametrize("name", ["llama_gqa", "bloom"])
def test_chunked_causal_attention_equals_one_whole_window(name):
    # 300 tokens: cache-free attention runs 2 query chunks (256, 44), each against only the keys up to its
    # last query; the cached path attends one whole masked window. Both must give the same logits.
    from afpq_jax._src.models.transformer import query_chunk
    model = aq.load(FIXTURES / name)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, model.cfg.vocab_size, (2, 300)), jnp.int32)
    assert query_chunk(300) < 300 and 300 % query_chunk(300)
    whole, _ = model.forward_with_cache(ids, model.init_cache(2, 300), 0)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(whole), rtol=0, atol=2e-5)


def test_gguf_import_matches_the_same_model_as_safetensors(tmp_path):
    weights = test_gguf._hf_weights(np.random.default_rng(1), tied=False)
    gguf_path = test_gguf.write_tiny_llama(tmp_path / "tiny.gguf", weights)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(read_gguf_config(gguf_path)))
    save_file({k: test_gguf._stored(k, v) for k, v in weights.items()}, str(hf_dir / "model.safetensors"))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, test_gguf.VOCAB, (2, 12)), jnp.int32)
    from_gguf = np.asarray(aq.load(gguf_path)(ids))
    from_st = np.asarray(aq.load(hf_dir)(ids))
    np.testing.assert_allclose(from_gguf, from_st, rtol=0, atol=1e-6)


def test_quant_dense_uses_the_packed_weight():
    layer = aq.QuantDense(96, 24, use_bias=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 96)), jnp.float32)
    w = layer.kernel.get_value()
    qt = layer.quantize(aq.QuantScheme.create("fp3", group_size=32))
    assert layer.is_quantized and not hasattr(layer, "kernel")
    np.testing.assert_allclose(layer(x), x @ aq.dequantize(qt) + layer.bias.get_value(), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(layer(x) - x @ w).max()) > 0  # really quantized
    with pytest.raises(ValueError, match="does not match layer"):
        aq.QuantDense(8, 8).set_quantized(aq.quantize(np.ones((8, 4), np.float32), "nf4"))
    with pytest.raises(aq.InputError, match="in_features"):
        aq.QuantDense(96, 24)(x[:, :50])
    # a scheme's dynamic int8 activations come along (they were dropped: the layer ran float activations)
    a8 = aq.QuantDense(96, 24)
    a8.quantize(aq.QuantScheme.create("int4", group_size=32, act_bits=8, act_mode="dynamic"))
    assert str(a8.scheme) == "int4-asym-g32-a8dynamic"
    from afpq_jax.kernels import quantized_matmul_a8
    np.testing.assert_array_equal(a8(x), quantized_matmul_a8(x, a8.quantized_tensor(), None))
    static = aq.QuantDense(96, 24)
    static.quantize(aq.QuantScheme.create("int4", act_bits=8, act_mode="static"))  # no scale yet: weights only
    assert str(static.scheme) == "int4-asym-g128"
    with pytest.raises(TypeError, match="takes a QuantScheme"):
        aq.QuantDense(96, 24).quantize("nf4")


def test_causal_lm_checks_its_token_ids():
    model = aq.load(FIXTURES / "llama_gqa")
    vocab = model.cfg.vocab_size
    for ids, exc, msg in [(np.asarray([[1, vocab]]), aq.InputError, "must lie in"),  # gave NaN logits
                          (np.asarray([[-1, 2]]), aq.InputError, "must lie in"),  # wrapped around
                          (np.asarray([1, 2, 3]), aq.InputError, "batch, seq"),
                          (np.asarray([[1.0, 2.0]]), TypeError, "integer token ids")]:
        with pytest.raises(exc, match=msg):
            model(ids)
    jax.jit(lambda m, ids: m(ids))(model, jnp.asarray([[1, 2]]))  # traced ids: shape and dtype checks only


def test_quant_scheme_is_canonical_and_valid_however_it_is_built():
    assert aq.QuantScheme(format="fp4") == aq.QuantScheme.create("fp4_e2m1")  # aliases become canonical names
    assert str(aq.QuantScheme(format="fp4", scale_dtype=jnp.bfloat16)) == "fp4_e2m1-asym-g128"
    assert type(aq.QuantScheme(format="nf3", group_size=np.int64(64)).group_size) is int  # JSON-serialisable
    assert type(aq.QuantScheme(format="int4", act_bits=np.int64(8), act_mode="dynamic").act_bits) is int
    for kwargs, message in [({"format": "bogus"}, "unknown format"), ({"format": "nf3", "group_size": 0}, "group_size"),
                            ({"format": "nf3", "scale_dtype": "foo"}, "scale_dtype"),
                            ({"format": "int4", "act_bits": 8.0, "act_mode": "dynamic"}, "act_bits"),
                            ({"format": "nf3", "asym": 1}, "asym")]:
        with pytest.raises(aq.InputError, match=message):
            aq.QuantScheme(**kwargs)


def test_sharded_index_with_missing_shard_is_reported(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_sharded", d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing shard"):
        aq.load(d)
