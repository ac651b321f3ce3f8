"""What the tests share (one place): fixture paths and schemes, tiny-model and GGUF writers, CLI error helpers,
the subprocess scripts, simulated devices. Pytest fixtures live in conftest.py; model data in fixtures/."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import textwrap
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

import afpq_jax as aq
from afpq_jax import QuantRule, QuantScheme
from afpq_jax import convert as convert_cli
from afpq_jax import eval as eval_cli
from afpq_jax._src.io.gguf import permute_qk

FIXTURES = Path(__file__).parent / "fixtures"


NF3 = QuantScheme.create("nf3", group_size=32)
INT4 = QuantScheme.create("int4", group_size=32)
FP3_SYM = QuantScheme.create("fp3", group_size=16, asym=False)
MIXED = [QuantRule(r"layers\.\d+\.mlp\.down_proj", INT4), QuantRule(r"layers\.\d+\.attn\.o_proj", None),
         QuantRule(r"layers\.\d+\.mlp\.(gate|up)_proj", FP3_SYM), QuantRule("lm_head", None), QuantRule(".*", NF3)]


def expected_layout(paths):
    out = {}
    for p in paths:
        if p.endswith("down_proj"):
            out[p] = INT4
        elif p.endswith(("gate_proj", "up_proj")):
            out[p] = FP3_SYM
        elif p.endswith(("q_proj", "k_proj", "v_proj")):
            out[p] = NF3
    return out


def random_calibration(vocab=256, n=4, seqlen=16, **kw):
    """Random token windows, by default shaped as the CLI's ``--calib-random --calib-samples 4 --calib-seqlen 16``
    (minibatches of 2, searches over all 4): most calibrated tests use this one shape, so their compiled block
    programs are shared through the persistent compilation cache."""
    ids = np.random.default_rng(0).integers(0, vocab, (n, seqlen)).astype(np.int32)
    return aq.Calibration(token_ids=ids, **kw)


def emulated_int8_matmul(x: np.ndarray, qt, input_scale) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: fake-quantized activations (numpy) times the dequantized weight; also |terms| bound."""
    x = np.asarray(x, np.float32)
    if input_scale is None:
        amax = np.abs(x).max(-1, keepdims=True)
        s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    else:
        s = np.float32(input_scale)
    inv = (np.float32(1) / s).astype(np.float32)
    xq = np.clip(np.round(x * inv), -127, 127)
    w = np.asarray(aq.dequantize(qt, jnp.float32), np.float64)
    xf = xq * np.asarray(s, np.float64)
    return xf @ w, np.abs(xf) @ np.abs(w)


def foldable_float_model(fixture: str):
    """A fixture's float model and config, with the GELU MLP's input scale (`mlp_act_scale`) switched on where
    the MLP is GELU (BLOOM), so every equalization fold has somewhere to go; and its stored reference logits."""
    import dataclasses

    from afpq_jax._src.io.sources import open_source
    from afpq_jax._src.loading import CheckpointWeights, load_float
    from afpq_jax._src.models import config_from_hf
    src = open_source(FIXTURES / fixture)
    cfg = config_from_hf(src.config)
    if cfg.mlp == "gelu":
        cfg = dataclasses.replace(cfg, mlp_act_scale=True)
    return load_float(CheckpointWeights(src, cfg), cfg), cfg, np.load(FIXTURES / fixture / "reference.npz")


def fixture_config(name: str = "llama_gqa", **change) -> dict:
    """A fixture's config.json as a dict, with ``change`` applied (a value of ``...`` deletes the key)."""
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    for k, v in change.items():
        if v is ...:
            hf.pop(k, None)
        else:
            hf[k] = v
    return hf


def copy_fixture(tmp_path: Path, name: str = "llama_gqa") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def numpy_llama_nll(w: dict[str, np.ndarray], cfg: dict, ids: np.ndarray) -> float:
    """Mean next-token NLL of a plain numpy LLaMA forward (HF rotate-half RoPE, GQA, tied head)."""
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    t = len(ids)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x: np.ndarray) -> np.ndarray:
        return x * cos + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd).transpose(1, 0, 2))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    logits = rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(t - 1), ids[1:]].mean())


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under ``roots`` with its bytes' digest: 'byte-for-byte as before'."""
    out = {}
    for root in roots:
        if not os.path.lexists(root):
            out[str(root)] = "absent"
            continue
        for p in sorted([root, *root.rglob("*")]):
            out[str(p)] = ("dir" if p.is_dir() and not p.is_symlink()
                           else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other")
    return out


HOLD = textwrap.dedent("""
    import sys, time
    from afpq_jax._src.io import outputs
    with outputs.claim(sys.argv[1], what="--out", hint="--overwrite"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


Q = gguf.GGMLQuantizationType

HIDDEN, N_HEAD, N_KV, HEAD_DIM, FFN, N_LAYERS, CTX = 32, 4, 2, 8, 48, 2, 256


# A tiny byte-level BPE vocabulary: 2 control tokens, the 256 byte symbols, a few merges.
def byte_alphabet() -> list[str]:
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
TOKENS = SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe", "20", "ca", "cat"]
VOCAB = len(TOKENS)


def tiny_hf_weights(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
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


TO_GGUF = {
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


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{TO_GGUF[module]}.{kind}"


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
            w.add_tensor(gguf_name(hf), np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp's names of the other architectures' block tensors (its convert_hf_to_gguf.py / tensor_mapping.py)
TO_GGUF_FAMILY = {
    "qwen2": TO_GGUF,
    "qwen3": {**TO_GGUF, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "gemma3": {**TO_GGUF, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}


def write_family_gguf(path: Path, hf_dir: Path, arch: str) -> Path:
    """The HF checkpoint ``hf_dir`` (a qwen2 / qwen3 / gemma3_text fixture) written as llama.cpp's converter
    writes it: its names, q/k rows as HF has them (NeoX rotary), Gemma's norm weights plus one, the metadata
    keys it records (not Gemma's layer pattern, local RoPE base or attention scale: llama.cpp hard-codes them).
    Embeddings as Q8_0, the first down_proj as F16 (dequantized on load); the rest float32."""
    import json

    from safetensors.numpy import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    table = TO_GGUF_FAMILY[arch]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
        w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for hf, arr in weights.items():
        if hf == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf == "model.norm.weight":
            name = "output_norm.weight"
        elif hf == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf.split(".", 3)
            module, _, kind = rest.rpartition(".")
            name = f"blk.{layer}.{table[module]}.{kind}"
        if arch == "gemma3" and hf.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
        qtype = Q.Q8_0 if name == "token_embd.weight" else Q.F16 if name == "blk.0.ffn_down.weight" else None
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids) -> np.ndarray:
    """``model(ids)`` compiled as one program (`_jit_forward`): an eager forward compiles every op separately,
    seconds on a cold cache even for the tiny fixtures."""
    return np.asarray(_jit_forward(model, jnp.asarray(ids)))


@nnx.jit
def _jit_forward(model, ids):
    return model(ids)


def simulated_devices(n: int) -> str:
    """XLA_FLAGS for ``n`` CPU devices. XLA's in-process collectives abort when one device thread is 40 s late at
    a rendezvous, which a loaded 2-core machine can cause (seen: an all-reduce over 4 simulated devices while
    other jobs ran); the generous limits keep such tests from flaking."""
    base = os.environ.get("XLA_FLAGS", "")  # the suite's own flags (conftest.py) still apply in the subprocess
    return (f"{base} --xla_force_host_platform_device_count={n} "
            f"--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds=600").strip()


# ---- algorithms ----

def indefinite_hessian(k: int, negative: float, seed: int = 0) -> np.ndarray:
    """A symmetric K x K matrix with eigenvalues ~U(0.5, 1.5) except one equal to ``negative``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    eig = rng.uniform(0.5, 1.5, k)
    eig[0] = negative
    return (q * eig) @ q.T


FORMATS = ["int3", "nf3", "fp3_e2m0", "int4", "nf4", "fp4_e2m1"]


# ---- cli ----

def cli_tool(name):
    from afpq_jax import train as train_cli
    return {"eval": eval_cli, "convert": convert_cli, "train": train_cli}[name]


def tool_error(capsys, tool, argv) -> str:
    """The one "error:" line of a failed in-process run (argparse's "prog: error: argument ..." included)."""
    rc = cli_tool(tool).main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def cli_error(capsys, argv) -> str:
    """The one line of a failed in-process `convert` run, which must be ours ("error: ..."), not argparse's."""
    line = tool_error(capsys, "convert", argv)
    assert line.startswith("error:"), line
    return line


# ---- io ----

def read_safetensors_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path
