"""The GGUF reader: a tiny LLaMA written the way llama.cpp writes it reads back as the original HF tensors, config
and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import afpq_jax as aq
from afpq_jax._src.io.gguf import (convert_gguf_to_hf, gguf_tensor_plan, iter_gguf_tensors, permute_qk,
                                   read_gguf_config, unpermute_qk, write_hf_tokenizer)
from tests.support import (CTX, FFN, HEAD_DIM, HIDDEN, N_HEAD, N_KV, N_LAYERS, QUANT_TYPES, VOCAB, Q, tiny_hf_weights,
                           write_tiny_llama)

gguf = pytest.importorskip("gguf")


def _stored(hf: str, w: np.ndarray) -> np.ndarray:
    """What the reader should return for ``hf``: the original after the storage type's round trip."""
    qtype = QUANT_TYPES.get(hf)
    if qtype is None:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).astype(np.float32)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, dict[str, np.ndarray], bool]:
    weights = tiny_hf_weights(np.random.default_rng(0), tied=request.param)
    return write_tiny_llama(tmp_path / "tiny.gguf", weights), weights, request.param


def test_gguf_import_matches_the_same_model_as_safetensors(tmp_path):
    weights = tiny_hf_weights(np.random.default_rng(1), tied=False)
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf", weights)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(read_gguf_config(gguf_path)))
    save_file({k: _stored(k, v) for k, v in weights.items()}, str(hf_dir / "model.safetensors"))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 12)), jnp.int32)
    from_gguf = np.asarray(aq.load(gguf_path)(ids))
    from_st = np.asarray(aq.load(hf_dir)(ids))
    np.testing.assert_allclose(from_gguf, from_st, rtol=0, atol=1e-6)


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
    path = write_tiny_llama(tmp_path / "s.gguf", tiny_hf_weights(np.random.default_rng(1), True), rope_scaling=4.0)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_convert_to_hf_dir(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    weights = tiny_hf_weights(np.random.default_rng(2), tied=True)
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
    path = write_tiny_llama(tmp_path / "t.gguf", tiny_hf_weights(np.random.default_rng(3), True))
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


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "g.gguf", tiny_hf_weights(np.random.default_rng(4), True), arch="gpt2")
    supported = r"must be one of \['llama', 'qwen2', 'qwen3', 'gemma3'\]"
    with pytest.raises(ValueError, match=r"'gpt2'.*" + supported):
        read_gguf_config(path)
    with pytest.raises(ValueError, match=supported):
        next(iter_gguf_tensors(path))
    with pytest.raises(ValueError, match=supported):
        write_hf_tokenizer(path, tmp_path / "tok")


def test_unknown_tensor_is_rejected(tmp_path: Path) -> None:
    path = write_tiny_llama(
        tmp_path / "moe.gguf",
        tiny_hf_weights(np.random.default_rng(5), True),
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


@pytest.mark.parametrize("fixture,arch", [("gemma3", "gemma3"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_other_architectures_load_as_their_hf_checkpoint(tmp_path: Path, fixture: str, arch: str) -> None:
    """A GGUF written as llama.cpp writes these architectures loads to the HF fixture's model: every parameter
    (Gemma's norms less the converter's +1; Q8_0 embeddings and an F16 kernel as gguf dequantizes them) and the
    config, but for what the GGUF cannot record (Gemma: llama.cpp's fixed layer pattern and attention scale;
    Qwen's sliding window)."""
    import dataclasses

    import gguf as gguf_lib
    from flax import nnx

    import afpq_jax as aq
    from tests.support import FIXTURES, write_family_gguf
    path = write_family_gguf(tmp_path / f"{fixture}.gguf", FIXTURES / fixture, arch)
    got, want = aq.load(path), aq.load(FIXTURES / fixture)
    expected = want.cfg
    if arch == "gemma3":
        expected = dataclasses.replace(
            expected, model_type="gemma3_text", layer_types=("sliding_attention",) * 3, query_pre_attn_scalar=32,
            final_softcap=None, rope_scaling=None, max_position_embeddings=128)
    elif arch == "qwen3":  # llama.cpp records no Qwen sliding window
        expected = dataclasses.replace(expected, sliding_window=None, layer_types=None)
    assert got.cfg == expected
    reader = gguf_lib.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    flat_got = dict(nnx.to_flat_state(nnx.state(got)))
    for key, var in nnx.to_flat_state(nnx.state(want)):
        a, b = np.asarray(flat_got[key].get_value()), np.asarray(var.get_value())
        dotted = ".".join(map(str, key))
        if dotted == "embed.weight":  # Q8_0: gguf's own dequantization of what was written
            b = gguf_lib.quants.dequantize(stored["token_embd.weight"].data, gguf_lib.GGMLQuantizationType.Q8_0)
            b = b.reshape(a.shape)
        atol = 1e-7 if "norm" in dotted else 0  # 1 + w - 1 in float32
        tol = 2e-3 if dotted == "layers.0.mlp.down_proj.kernel" else atol  # F16
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=dotted)
