"""GGUF reader: a tiny random LLaMA written the way llama.cpp's converter writes it must read back
as the original HF tensors (q/k un-permuted, dequantized, torch layout) with its config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from afpq_jax._src.io.gguf import (  # noqa: E402
    convert_gguf_to_hf,
    gguf_tensor_plan,
    iter_gguf_tensors,
    permute_qk,
    read_gguf_config,
    unpermute_qk,
    write_hf_tokenizer,
)

Q = gguf.GGMLQuantizationType

HIDDEN, N_HEAD, N_KV, HEAD_DIM, FFN, N_LAYERS, CTX = 32, 4, 2, 8, 48, 2, 256


# A tiny byte-level BPE vocabulary: 2 control tokens, the 256 byte symbols, a few merges.
def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, spelled out so the test does not depend on transformers internals."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "2 0", "c a", "ca t"]
TOKENS = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "20", "ca", "cat"]
VOCAB = len(TOKENS)


def _hf_weights(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    """Random float32 weights with HF LlamaForCausalLM names and torch shapes."""
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((N_HEAD * HEAD_DIM, HIDDEN), dtype=np.float32)
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, HIDDEN), dtype=np.float32)
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, HIDDEN), dtype=np.float32)
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((HIDDEN, N_HEAD * HEAD_DIM), dtype=np.float32)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FFN, HIDDEN), dtype=np.float32)
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, HIDDEN), dtype=np.float32)
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, FFN), dtype=np.float32)
    w["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN, dtype=np.float32)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32)
    return w


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}

# Non-F32 storage for a few tensors, to exercise dequantization (incl. a permuted one).
QUANT_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.k_proj.weight": Q.Q4_1,
    "model.layers.1.mlp.down_proj.weight": Q.F16,
}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def _stored(hf: str, w: np.ndarray) -> np.ndarray:
    """What the reader should return for ``hf``: the original after the storage type's round trip."""
    qtype = QUANT_TYPES.get(hf)
    if qtype is None:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


def write_tiny_llama(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    rope_scaling: float | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``weights`` as llama.cpp's convert_hf_to_gguf.py would (permuted q/k, llama.* keys)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    for hf, arr in weights.items():
        if ".q_proj." in hf:
            arr = permute_qk(arr, N_HEAD)
        elif ".k_proj." in hf:
            arr = permute_qk(arr, N_KV)
        qtype = QUANT_TYPES.get(hf)
        if qtype is None:
            w.add_tensor(_gguf_name(hf), np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, dict[str, np.ndarray], bool]:
    weights = _hf_weights(np.random.default_rng(0), tied=request.param)
    return write_tiny_llama(tmp_path / "tiny.gguf", weights), weights, request.param


# ---- permutation ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_head=st.integers(1, 6),
    half=st.integers(1, 6),
    cols=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpermute_is_exact_inverse_and_matches_rotary_pairing(n_head: int, half: int, cols: int, seed: int) -> None:
    rows = n_head * 2 * half
    shape = (rows, cols) if cols else (rows,)  # cols == 0: a bias vector
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert np.array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    # Semantics: GGUF row h*hd + 2*i + j holds HF row h*hd + j*half + i (halves -> interleaved pairs).
    g = permute_qk(w, n_head)
    hd = 2 * half
    for h in range(n_head):
        for i in range(half):
            for j in range(2):
                assert np.array_equal(g[h * hd + 2 * i + j], w[h * hd + j * half + i])


def test_permutation_rejects_indivisible_rows() -> None:
    with pytest.raises(ValueError, match="divisible"):
        unpermute_qk(np.zeros((6, 4), np.float32), 2)


# ---- round trip ---------------------------------------------------------------------------------


def test_tensors_round_trip(tiny: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    path, weights, tied = tiny
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(weights)
    assert ("lm_head.weight" in got) == (not tied)
    for name, orig in weights.items():
        arr = got[name]
        assert arr.dtype == np.float32 and arr.shape == orig.shape, name
        if name in QUANT_TYPES:
            np.testing.assert_array_equal(arr, _stored(name, orig), err_msg=name)
            tol = {Q.Q8_0: 0.02, Q.Q4_1: 0.25, Q.F16: 2e-3}[QUANT_TYPES[name]]
            np.testing.assert_allclose(arr, orig, atol=tol * float(np.abs(orig).max()), err_msg=name)
        else:
            np.testing.assert_array_equal(arr, orig, err_msg=name)  # F32: bit-exact
    # The plan (used to lay out safetensors before dequantizing) agrees with what is yielded.
    assert [(n, a.shape) for n, a in iter_gguf_tensors(path)] == gguf_tensor_plan(path)


def test_config_round_trip(tiny: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    path, _, tied = tiny
    cfg = read_gguf_config(path)
    expected = {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0,
        "max_position_embeddings": CTX,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert "rope_scaling" not in cfg
    json.dumps(cfg)  # plain JSON types only


def test_config_is_accepted_by_transformers(tiny: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**read_gguf_config(tiny[0]))
    assert cfg.num_key_value_heads == N_KV and cfg.head_dim == HEAD_DIM


def test_rope_scaling_is_read(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "s.gguf", _hf_weights(np.random.default_rng(1), True), rope_scaling=4.0)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_convert_to_hf_dir(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    weights = _hf_weights(np.random.default_rng(2), tied=True)
    path = write_tiny_llama(tmp_path / "t.gguf", weights)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(weights)
    for name, orig in weights.items():
        np.testing.assert_array_equal(loaded[name], _stored(name, orig), err_msg=name)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == N_KV
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(path, out)


# ---- tokenizer ----------------------------------------------------------------------------------


def test_hf_tokenizer_export(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_tiny_llama(tmp_path / "t.gguf", _hf_weights(np.random.default_rng(3), True))
    write_hf_tokenizer(path, tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok("the cat 2024<|im_end|>", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # merges applied ("the", "cat"), digits split one by one despite the "2 0" merge
    # (smollm pre-tokenizer), control token kept whole.
    assert pieces == ["t", "he", "Ġ", "cat", "Ġ", "2", "0", "2", "4", "<|im_end|>"]
    assert tok.decode(ids) == "the cat 2024<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|endoftext|>"
    assert tok.decode(tok("naïve café ☃")["input_ids"]) == "naïve café ☃"  # byte fallback via byte alphabet


# ---- bad inputs ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gguf_config(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        next(iter_gguf_tensors(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 8)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_gguf_config(bad)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        next(iter_gguf_tensors(bad))


def test_truncated_gguf(tmp_path: Path, tiny: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[0].read_bytes()[:200])
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf_config(cut)


def test_non_llama_architecture(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "g.gguf", _hf_weights(np.random.default_rng(4), True), arch="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2'.*only llama-family"):
        read_gguf_config(path)
    with pytest.raises(ValueError, match="only llama-family"):
        next(iter_gguf_tensors(path))
    with pytest.raises(ValueError, match="only llama-family"):
        write_hf_tokenizer(path, tmp_path / "tok")


def test_unknown_tensor_is_rejected(tmp_path: Path) -> None:
    path = write_tiny_llama(
        tmp_path / "moe.gguf",
        _hf_weights(np.random.default_rng(5), True),
        extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)},
    )
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        list(iter_gguf_tensors(path))


def test_slices_equal_the_whole_tensor(tiny: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    """Per-shard reads (sharded loading): only the slice's rows are dequantized; q/k by whole heads."""
    from afpq_jax._src.io import sources

    path, weights, _ = tiny
    src = sources.open_source(path)
    assert src.reads_slices
    for name in src.tensor_names:
        full = src.read(name)
        assert src.describe(name) == (np.dtype(np.float32), full.shape)
        indexes = [tuple(slice(0, d) for d in full.shape), tuple(slice(d // 3, d - 1) for d in full.shape),
                   (slice(1, 2),) + tuple(slice(None) for _ in full.shape[1:])]
        if full.ndim == 2:  # a head-straddling row range, and a slice within rows
            indexes += [(slice(HEAD_DIM // 2 + 1, full.shape[0] - 3), slice(None)), (slice(None), slice(5, 9))]
        for index in indexes:
            np.testing.assert_array_equal(src.read_slice(name, index), full[index], err_msg=f"{name} {index}")
    # a row range dequantizes only its rows (whole heads for q: 8 rows per head here)
    from afpq_jax._src.io.gguf import GGUFTensors

    tensors = GGUFTensors(path)
    rows: list[int] = []
    dequantize = tensors._dequantize
    tensors._dequantize = lambda n, data, shape: (rows.append(shape[0]), dequantize(n, data, shape))[1]
    tensors.read_slice("model.layers.0.mlp.down_proj.weight", (slice(4, 10), slice(None)))
    tensors.read_slice("model.layers.0.self_attn.q_proj.weight", (slice(9, 11), slice(None)))
    assert rows == [6, HEAD_DIM]
