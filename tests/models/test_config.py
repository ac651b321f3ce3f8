"""`config_from_hf` and `ModelConfig`: architecture features, and every bad config.json field as a one-line error."""

import json
import math

import pytest

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.models import ModelConfig, config_from_hf
from tests.support import FIXTURES, fixture_config


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
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: bloom, gemma3, gemma3_text, llama, mistral, qwen2, qwen3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "only 'silu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_unsupported_configs_are_named(change, msg):
    hf = {**json.loads((FIXTURES / "llama_gqa" / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=msg):
        config_from_hf(hf)


def test_config_dict_that_is_not_an_object():
    # converted checkpoints read their config.json without `open_source`: config_from_hf checks it too
    with pytest.raises(CheckpointError, match=r"config\.json must be a JSON object"):
        config_from_hf([1, 2])
    with pytest.raises(InputError, match=r"unsupported model_type \['llama'\]"):
        config_from_hf(fixture_config(model_type=["llama"]))


# ---- config.json fields: present, of the right type, in range ------------------------------------------------

@pytest.mark.parametrize("name,key", [
    ("llama_gqa", "hidden_size"), ("llama_gqa", "num_attention_heads"), ("llama_gqa", "vocab_size"),
    ("llama_gqa", "intermediate_size"), ("llama_gqa", "num_hidden_layers"),
    ("bloom", "n_head"), ("bloom", "n_layer"), ("bloom", "vocab_size"),
])
def test_missing_required_field(name, key):
    with pytest.raises(CheckpointError, match=rf"config\.json has no '{key}'( \(or '\w+'\))?; .*must have it"):
        config_from_hf(fixture_config(name, **{key: ...}))
    with pytest.raises(CheckpointError, match=rf"config\.json has no '{key}'"):  # null counts as missing
        config_from_hf(fixture_config(name, **{key: None}))


def test_bloom_field_aliases():
    # BloomConfig reads hidden_size / n_embed, n_head / num_attention_heads, n_layer / num_hidden_layers
    with pytest.raises(CheckpointError, match=r"config\.json has no 'hidden_size' \(or 'n_embed'\)"):
        config_from_hf(fixture_config("bloom", hidden_size=...))
    renamed = config_from_hf(fixture_config("bloom", hidden_size=..., n_embed=64, n_head=..., num_attention_heads=4,
                                 n_layer=..., num_hidden_layers=2))
    assert renamed == config_from_hf(fixture_config("bloom"))


_V5_THETA = {"rope_type": "default"}  # rope_parameters without its rope_theta, for bad thetas

LLAMA_BAD_FIELDS = [
    # key, value, message fragment
    ("rms_norm_eps", "1e-5", r"config\.json: rms_norm_eps must be a positive finite number, got '1e-5' \(a string\)"),
    ("rms_norm_eps", 0, r"rms_norm_eps must be a positive finite number, got 0"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps must be a positive finite number"),
    ("rms_norm_eps", math.nan, r"rms_norm_eps must be a positive finite number, got nan"),
    ("rms_norm_eps", True, r"rms_norm_eps must be a positive finite number, got True \(a boolean\)"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": 0}, r"rope_parameters\.rope_theta must be a positive finite"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": "1e4"}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": "abc"}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": -1.0}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", {**_V5_THETA, "rope_theta": math.inf}, r"rope_parameters\.rope_theta must be a positive"),
    ("rope_parameters", [1, 2], r"config\.json: rope_parameters must be a JSON object, got \[1, 2\]"),
    ("rope_scaling", "linear", r"config\.json: rope_scaling must be a JSON object, got 'linear' \(a string\)"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, r"rope_scaling\.factor must be a positive finite"),
    ("rope_scaling", {"rope_type": "linear", "factor": "2"}, r"rope_scaling\.factor must be a positive finite"),
    ("rope_scaling", {"type": "linear"}, r"rope_scaling has no 'factor'; rope_type 'linear' needs it"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, r"rope_scaling has no 'low_freq_factor'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, r"high_freq_factor \(4\.0\) must be greater than"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 3.5}, r"original_max_position_embeddings must be a pos"),
    ("vocab_size", "256", r"config\.json: vocab_size must be a positive integer, got '256' \(a string\)"),
    ("vocab_size", 256.0, r"vocab_size must be a positive integer, got 256\.0"),
    ("vocab_size", True, r"vocab_size must be a positive integer, got True \(a boolean\)"),
    ("vocab_size", -1, r"vocab_size must be a positive integer, got -1"),
    ("hidden_size", "64", r"hidden_size must be a positive integer"),
    ("intermediate_size", 0, r"intermediate_size must be a positive integer, got 0"),
    ("num_hidden_layers", 2.5, r"num_hidden_layers must be a positive integer, got 2\.5"),
    ("num_attention_heads", True, r"num_attention_heads must be a positive integer"),
    ("num_key_value_heads", -2, r"num_key_value_heads must be a positive integer, got -2"),
    ("num_key_value_heads", 0, r"num_key_value_heads must be a positive integer, got 0"),
    ("head_dim", "16", r"head_dim must be a positive integer, got '16' \(a string\)"),
    ("max_position_embeddings", "128", r"max_position_embeddings must be a positive integer"),
    ("tie_word_embeddings", "false", r"tie_word_embeddings must be true or false, got 'false' \(a string\)"),
    ("attention_bias", 1, r"attention_bias must be true or false, got 1"),
    ("mlp_bias", "no", r"mlp_bias must be true or false"),
    ("bos_token_id", "1", r"bos_token_id must be an integer of at least 0, got '1' \(a string\)"),
    ("bos_token_id", 1.5, r"bos_token_id must be an integer of at least 0, got 1\.5"),
    ("eos_token_id", [2, "3"], r"eos_token_id\[1\] must be an integer of at least 0, got '3'"),
    ("eos_token_id", "2", r"eos_token_id must be an integer of at least 0"),
    ("eos_token_id", True, r"eos_token_id must be an integer of at least 0, got True"),
    ("hidden_act", 5, r"config\.json: hidden_act must be a string, got 5"),
]


@pytest.mark.parametrize("key,value,message", LLAMA_BAD_FIELDS)
def test_bad_llama_field(key, value, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(fixture_config(**{key: value}))


def test_bad_transformers4_rope_theta():
    hf = fixture_config(rope_parameters=..., rope_theta=0.0)
    with pytest.raises(CheckpointError, match=r"config\.json: rope_theta must be a positive finite number, got 0"):
        config_from_hf(hf)


def test_hidden_size_not_divisible_by_heads():
    hf = fixture_config(head_dim=..., num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(CheckpointError, match=r"hidden_size \(64\) must be divisible by num_attention_heads \(6\)"):
        config_from_hf(hf)


def test_mistral_sliding_window_must_be_an_integer():
    with pytest.raises(CheckpointError, match=r"sliding_window must be a positive integer, got '4096'"):
        config_from_hf(fixture_config(model_type="mistral", sliding_window="4096"))
    cfg = config_from_hf(fixture_config(model_type="mistral", sliding_window=64))
    assert cfg.window(0) == cfg.window(cfg.num_layers - 1) == 64 and cfg.max_position_embeddings == 128


def test_qwen_sliding_window_defaults_are_transformers():
    """use_sliding_window without sliding_window / max_window_layers: Qwen2Config's 4096 from layer 28 on."""
    hf = json.loads((FIXTURES / "qwen3" / "config.json").read_text())
    hf = {k: v for k, v in hf.items() if k not in ("sliding_window", "max_window_layers", "layer_types")}
    hf.update(num_hidden_layers=30, use_sliding_window=True)
    cfg = config_from_hf(hf)
    assert [cfg.window(i) for i in (0, 27, 28, 29)] == [None, None, 4096, 4096]


BLOOM_BAD_FIELDS = [
    ("layer_norm_epsilon", "1e-5", r"layer_norm_epsilon must be a positive finite number, got '1e-5'"),
    ("layer_norm_epsilon", 0.0, r"layer_norm_epsilon must be a positive finite number"),
    ("n_head", "4", r"n_head must be a positive integer, got '4' \(a string\)"),
    ("n_layer", 0, r"n_layer must be a positive integer, got 0"),
    ("hidden_size", 66, r"hidden_size \(66\) must be divisible by n_head \(4\)"),
    ("tie_word_embeddings", "yes", r"tie_word_embeddings must be true or false"),
    ("apply_residual_connection_post_layernorm", "false", r"apply_residual_connection_post_layernorm must be true"),
    ("seq_length", "2048", r"seq_length must be a positive integer"),
    ("eos_token_id", -2, r"eos_token_id must be an integer of at least 0, got -2"),
]


@pytest.mark.parametrize("key,value,message", BLOOM_BAD_FIELDS)
def test_bad_bloom_field(key, value, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(fixture_config("bloom", **{key: value}))


def test_valid_variants_are_still_read():
    cfg = config_from_hf(fixture_config(eos_token_id=[2, 3], head_dim=None, num_key_value_heads=None, rope_scaling=None))
    assert cfg.eos_token_id == (2, 3) and cfg.head_dim == 16 and cfg.num_kv_heads == 4
    hash(cfg)  # the graphdef holds it
    bloom = config_from_hf(fixture_config("bloom", eos_token_id=[2, 3]))
    assert bloom.eos_token_id == (2, 3)
    hash(bloom)  # a list eos made BLOOM's config unhashable
    assert config_from_hf(fixture_config("llama3_rope")).rope_scaling_dict["low_freq_factor"] == 1.0


@pytest.mark.parametrize("change,message", [
    ({"norm_eps": "1e-5"}, r"config\.norm_eps must be a positive finite number, got '1e-5' \(a string\)"),
    ({"rope_theta": 0.0}, r"config\.rope_theta must be a positive finite number"),
    ({"vocab_size": True}, r"config\.vocab_size must be a positive integer, got True"),
    ({"max_position_embeddings": 0}, r"config\.max_position_embeddings must be a positive integer"),
    ({"tie_embeddings": "no"}, r"config\.tie_embeddings must be true or false"),
    ({"norm": "batch"}, r"config\.norm must be one of 'rms', 'layer'"),
    ({"eos_token_id": [2, 3]}, r"config\.eos_token_id must be an integer or a tuple of them"),
    ({"rope_scaling": (("rope_type", "linear"),)}, r"rope_scaling has no 'factor'"),
])
def test_model_config_validates_every_field(change, message):
    base = config_from_hf(fixture_config())
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(InputError, match=message):
        ModelConfig(**{**fields, **change})
