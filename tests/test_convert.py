"""convert -> checkpoint -> load -> eval, the CLI's bad-input behaviour, and honest on-disk size."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax import kernels
from afpq_jax import eval as eval_cli
from afpq_jax._src import checkpoint
from afpq_jax._src.evaluation import perplexity
from tests import test_gguf

FIXTURES = Path(__file__).parent / "fixtures"


def fake_quantized_reference(src, fmt, group_size, asym, include_lm_head=False):
    model = aq.load(src)
    for path, layer in model.linear_layers().items():
        if path != "lm_head" or include_lm_head:
            layer.kernel.set_value(aq.fake_quant(layer.kernel.get_value(), fmt, group_size=group_size, asym=asym))
    return model


@pytest.mark.parametrize("fixture,args,fmt,g,asym,lm_head", [
    ("llama_gqa", ["--format", "nf3", "--group-size", "32"], "nf3", 32, True, False),
    ("llama_gqa", ["--format", "int4", "--sym", "--group-size", "none", "--quantize-lm-head"], "int4", None, False,
     True),
    ("bloom", ["--format", "fp4", "--group-size", "48"], "fp4_e2m1", 48, True, False),
    ("llama3_rope", ["--format", "int3"], "int3", 128, True, False),
])
def test_roundtrip_logits_equal_in_memory_fake_quant(tmp_path, monkeypatch, fixture, args, fmt, g, asym, lm_head):
    out = tmp_path / "ckpt"
    assert convert_cli.main(["--model", str(FIXTURES / fixture), "--out", str(out), "--no-progress", *args]) == 0
    qc = json.loads((out / "quantization_config.json").read_text())
    assert qc["method"] == "rtn" and qc["layers"]
    assert all(s == {"format": fmt, "group_size": g, "asym": asym, "scale_dtype": "float16"}
               for s in qc["layers"].values())
    assert ("lm_head" in qc["layers"]) == lm_head
    loaded = aq.load(out)
    layers = loaded.linear_layers()
    assert all(layers[p].is_quantized == (p in qc["layers"]) for p in layers)
    ids = jnp.asarray(np.load(FIXTURES / fixture / "reference.npz")["input_ids"])
    want = np.asarray(fake_quantized_reference(FIXTURES / fixture, fmt, g, asym, lm_head)(ids))
    # The default CPU dispatch (the C++ kernel up to 256 rows) sums in another order than XLA's dot.
    np.testing.assert_allclose(np.asarray(loaded(ids)), want, rtol=1e-4, atol=1e-4)
    # Dequantize-then-dot reproduces the fake-quantized model bit for bit: the packed weights are exactly its
    # weights.
    monkeypatch.setitem(kernels.DISPATCH_ORDER, "cpu", ("xla",))
    np.testing.assert_array_equal(np.asarray(aq.load(out)(ids)), want)


def _write_model(d: Path, hidden=256, inter=512, layers=2, vocab=64, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "max_position_embeddings": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    kv = hidden // 2
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)),
              p + "self_attn.k_proj.weight": rng.standard_normal((kv, hidden)),
              p + "self_attn.v_proj.weight": rng.standard_normal((kv, hidden)),
              p + "self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)),
              p + "mlp.gate_proj.weight": rng.standard_normal((inter, hidden)),
              p + "mlp.up_proj.weight": rng.standard_normal((inter, hidden)),
              p + "mlp.down_proj.weight": rng.standard_normal((hidden, inter)),
              p + "input_layernorm.weight": np.ones(hidden), p + "post_attention_layernorm.weight": np.ones(hidden)}
    save_file({k: (v * 0.02).astype(np.float32) for k, v in t.items()}, str(d / "model.safetensors"))
    return d


def _payload_bytes(params_dir: Path) -> int:
    """Bytes of orbax's array data files (no metadata/manifests)."""
    return sum(f.stat().st_size for f in params_dir.rglob("*") if f.is_file() and f.parent.name == "d")


def test_on_disk_size_of_4bit_g128_layers(tmp_path):
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    src = _write_model(tmp_path / "src")
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(src), "--out", str(out), "--format", "nf4", "--no-progress"]) == 0
    model = aq.load(out)
    n_weights = sum(layer.in_features * layer.out_features for layer in model.linear_layers().values())
    # The float part (embeddings, norms) saved alone, the same way, gives the bytes to subtract.
    float_tree = jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp_path / "float_only").absolute(), float_tree)
    ckpt.wait_until_finished()
    quant_bits = 8 * (_payload_bytes(out / "params") - _payload_bytes(tmp_path / "float_only")) / n_weights
    # 15%: orbax's OCDBT writes a timing-dependent number of data files, each with some overhead (a quiet
    # machine measured ~4.25 bits, loaded ones 4.36, 4.38 and 4.64); a packing error would be off by >= 25%.
    assert abs(quant_bits / (4 + 32 / 128) - 1) < 0.15, quant_bits


def _cli_error(capsys, argv):
    rc = convert_cli.main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(tmp_path, name="llama_gqa") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "does not exist" in _cli_error(capsys, ["--model", str(tmp_path / "nope"), *out])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _cli_error(capsys, ["--model", str(tmp_path / "empty"), *out])

    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    assert "unsupported model_type 'gpt_neox'; supported: bloom, llama, mistral" in _cli_error(
        capsys, ["--model", str(d), *out])
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 150}))
    assert "config.json does not match the weights" in _cli_error(capsys, ["--model", str(d), *out])
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(capsys, ["--model", str(d), *out])

    d2 = _copy(tmp_path / "t")
    st = d2 / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert "truncated" in _cli_error(capsys, ["--model", str(d2), *out])
    st.write_bytes(b"\xff" * 64)
    assert "corrupted" in _cli_error(capsys, ["--model", str(d2), *out])

    assert "unknown format 'fp5'" in _cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--format", "fp5",
                                                         *out])
    assert "tied" in _cli_error(capsys, ["--model", str(FIXTURES / "bloom"), "--quantize-lm-head", *out])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("exc,rc", [(KeyboardInterrupt, 130), (OSError, 2)])
def test_interrupted_conversion_leaves_nothing(tmp_path, capsys, monkeypatch, exc, rc):
    out = tmp_path / "o"
    real_save = checkpoint.write

    def save_then_die(model, directory, **kw):
        real_save(model, directory, **kw)  # the staging dir is fully written, then we die before the rename
        raise exc("disk full" if exc is OSError else "")

    monkeypatch.setattr(checkpoint, "write", save_then_die)
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]) == rc
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial staging directory left behind
    # an existing checkpoint survives a failed --overwrite
    monkeypatch.setattr(checkpoint, "write", real_save)
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(checkpoint, "write", save_then_die)
    convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--overwrite", "--no-progress"])
    assert sorted(p.name for p in out.rglob("*")) == before and aq.load(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_cli_exit_codes_and_help_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ["--model", "--format", "--group-size", "--sym", "--method", "--out", "--overwrite",
                 "--quantize-lm-head", "--scale-dtype", "--debug"]:
        assert flag in r.stdout
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--group-size", "0.5"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "group size" in r.stderr


def test_gguf_model_converts_with_its_tokenizer_and_evaluates(tmp_path, capsys):
    weights = test_gguf._hf_weights(np.random.default_rng(3), tied=True)
    src = test_gguf.write_tiny_llama(tmp_path / "tiny.gguf", weights)
    out = tmp_path / "q"
    assert convert_cli.main(["--model", str(src), "--out", str(out), "--format", "fp3", "--group-size", "16",
                             "--no-progress"]) == 0
    assert (out / "tokenizer.json").exists()
    tok = aq.load_tokenizer(out)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["hello world"] * 200))
    capsys.readouterr()
    assert eval_cli.main(["--model", str(out), "--text", str(text), "--seq-len", "16", "--json", "--no-progress",
                          "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert res["windows"] == len(ids) // 16 and isinstance(res["generation"], str)
    assert res["perplexity"] == pytest.approx(perplexity(aq.load(out), ids, seq_len=16, progress=False)["perplexity"])


def test_perplexity_matches_numpy():
    model = aq.load(FIXTURES / "llama_gqa")
    ids = np.random.default_rng(0).integers(0, 256, 50).astype(np.int32)
    got = perplexity(model, ids, seq_len=12, batch_size=2, progress=False)
    windows = ids[:48].reshape(4, 12)
    logits = np.asarray(model(jnp.asarray(windows)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert got["windows"] == 4 and got["tokens"] == 44
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:5], seq_len=12, progress=False)


def test_hub_id_without_network_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; fail fast instead of timing out
    from afpq_jax import CheckpointError
    from afpq_jax._src.io.sources import open_source
    with pytest.raises(CheckpointError, match="without network access pass a local directory"):
        open_source("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_chunked_tokenization_matches_whole_text_at_paragraph_boundaries():
    from afpq_jax import tokenize
    weights = test_gguf._hf_weights(np.random.default_rng(5), tied=True)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = aq.load_tokenizer(test_gguf.write_tiny_llama(Path(d) / "t.gguf", weights))
    paragraphs = [" ".join(["hello world"] * (3 + i % 5)) for i in range(40)]
    text = "\n\n".join(paragraphs)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    chunked = tokenize(tok, text, chunk_chars=50)
    assert chunked.dtype == np.int32 and chunked.tolist() == whole


# ---- the command-line tools' flags: bad values and combinations are one line, exit status 2 ------------------

def _tool(name):
    from afpq_jax import train as train_cli
    return {"eval": eval_cli, "convert": convert_cli, "train": train_cli}[name]


def _tool_error(capsys, tool, argv) -> str:
    """The one "error:" line of a failed in-process run (argparse's "prog: error: argument ..." included)."""
    rc = _tool(tool).main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


@pytest.mark.parametrize("tool,argv,message", [
    # 1: counts where 0 or a negative number means nothing are refused by argparse
    ("eval", ["--batch-size", "-1"], "--batch-size: must be a positive integer, got '-1'"),
    ("eval", ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    ("eval", ["--max-windows", "-1"], "--max-windows: must be a positive integer"),
    ("eval", ["--max-windows", "0"], "--max-windows: must be a positive integer"),
    ("eval", ["--seq-len", "0"], "--seq-len: must be a positive integer"),
    ("eval", ["--seq-len", "1"], "--seq-len must be at least 2"),
    ("eval", ["--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens: must be a positive integer"),
    ("convert", ["--calib-samples", "0"], "--calib-samples: must be a positive integer"),
    ("convert", ["--calib-batch-size", "-2"], "--calib-batch-size: must be a positive integer"),
    ("convert", ["--calib-seqlen", "1", "--method", "gptq", "--calib-random"], "--calib-seqlen must be at least 2"),
    ("convert", ["--num-processes", "0"], "--num-processes: must be a positive integer"),
    ("train", ["--steps", "0"], "--steps: must be a positive integer"),
    ("train", ["--grad-accum", "-1"], "--grad-accum: must be a positive integer"),
    ("train", ["--samples", "0"], "--samples: must be a positive integer"),
    ("train", ["--eval-every", "-1"], "--eval-every must be >= 0"),
    ("train", ["--lr", "0"], "--lr must be > 0"),
    # 2: a window longer than the model's context (llama_gqa: 128 positions)
    ("eval", ["--seq-len", "100000"], "--seq-len 100000 exceeds the model's context of 128 tokens"),
    # 3: held-out evaluation exists only for the built-in Wikipedia split
    ("train", ["--eval-every", "5", "--calib-random"], "--eval-every scores the held-out part"),
    ("train", ["--eval-every", "5", "--calib-text", "TEXT"], "drop --eval-every or --calib-text"),
    # 5: --coordinator HOST:PORT
    ("eval", ["--coordinator", "notaport"], "'notaport' is not HOST:PORT"),
    ("convert", ["--coordinator", "host:99999"], "is not HOST:PORT"),
    ("convert", ["--coordinator", ":1234"], "is not HOST:PORT"),
    # 6: values that would be ignored
    ("eval", ["--top-k", "5", "--prompt", "hi"], "--top-k / --top-p only apply when sampling"),
    ("eval", ["--top-p", "0.9"], "add --temperature > 0"),
    ("convert", ["--calib-random", "--calib-text", "TEXT"], "--calib-random and --calib-text"),
    ("train", ["--calib-random", "--calib-text", "TEXT"], "--calib-random and --calib-text"),
    # 11: wording, flags named as flags
    ("convert", ["--format", "int4", "--act-scheme", "fptq"], "error: --act-scheme needs --act-bits 8"),
    ("convert", ["--format", "int4", "--act-scheme", "fptq", "--act-rule", "relative"],
     "error: --act-scheme, --act-rule need --act-bits 8"),
    ("convert", ["--method", "awq", "--damp", "0.1"], "error: --damp applies to --method gptq"),
    ("convert", ["--method", "awq", "--damp", "0.1", "--act-order"], "error: --damp, --act-order apply to"),
    ("convert", ["--method", "gptq", "--damp", "1.5"], "--damp must be in [0, 1)"),
    ("convert", ["--spill-dir", "SPILL", "--max-memory", "1G"], "--spill-dir SPILL is not an existing directory"),
])
def test_cli_bad_flags_are_one_line_errors(tmp_path, capsys, tool, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    spill = str(tmp_path / "nonexistent")
    argv = [{"TEXT": str(text), "SPILL": spill}.get(a, a) for a in argv]
    message = message.replace("SPILL", spill)
    out = tmp_path / "out"
    base = ["--model", str(FIXTURES / "llama_gqa"), "--no-progress"]
    base += ["--text", str(text)] if tool == "eval" else ["--out", str(out)]
    assert message in _tool_error(capsys, tool, [*base, *argv])
    assert not out.exists()


def test_user_files_and_missing_models_are_one_line_errors(tmp_path, capsys):
    utf16 = tmp_path / "rules.json"
    utf16.write_text('[{"pattern": ".*", "scheme": {"format": "nf3"}}]', encoding="utf-16")  # PowerShell's >
    latin = tmp_path / "t.txt"
    latin.write_bytes(b"caf\xe9 " * 100)
    model = ["--model", str(FIXTURES / "llama_gqa")]
    for tool, argv, message in [("convert", [*model, "--rules", str(utf16)], "is UTF-16 text"),
                                ("convert", [*model, "--rules", str(tmp_path)], "is a directory"),
                                ("eval", [*model, "--text", str(latin)], "is not UTF-8 text"),
                                ("eval", ["--model", str(tmp_path / "nope"), "--no-ppl"], "does not exist")]:
        assert message in _tool_error(capsys, tool, [*argv, "--no-progress", *(
            ["--out", str(tmp_path / "o")] if tool == "convert" else [])])


def test_library_perplexity_refuses_bad_windows_and_batches():
    model = aq.load(FIXTURES / "llama_gqa")  # context: 128 positions
    ids = np.random.default_rng(0).integers(0, 256, 300).astype(np.int32)
    for kw, message in [(dict(batch_size=0), "batch_size must be a positive integer"),
                        (dict(batch_size=-1), "batch_size must be a positive integer"),
                        (dict(max_windows=0), "max_windows must be a positive integer"),
                        (dict(max_windows=-1), "max_windows must be a positive integer"),
                        (dict(seq_len=0), "seq_len must be an integer of at least 2"),
                        (dict(seq_len=1), "seq_len must be an integer of at least 2"),
                        (dict(seq_len=129), "exceeds the model's context of 128 tokens")]:
        with pytest.raises(aq.InputError, match=re.escape(message)):
            perplexity(model, ids, progress=False, **kw)
    assert perplexity(model, ids, seq_len=128, max_windows=1, progress=False)["windows"] == 1


def test_default_output_names_keep_dots_and_resolve_directories(tmp_path, monkeypatch, capsys):
    from afpq_jax._src import cli
    model = _copy(tmp_path, "llama_gqa")
    model = model.rename(tmp_path / "Qwen2.5-0.5B")
    (tmp_path / "tiny.q4.gguf").write_bytes(b"")
    monkeypatch.chdir(model)
    assert cli.model_name("../Qwen2.5-0.5B") == cli.model_name(".") == cli.model_name(str(model)) == "Qwen2.5-0.5B"
    assert cli.model_name(str(tmp_path / "tiny.q4.gguf")) == "tiny.q4"
    assert cli.model_name("meta-llama/Llama-3.1-8B") != cli.model_name("meta-llama/Llama-3.1-70B")
    assert cli.model_name("meta-llama/Llama-3.1-8B") == "Llama-3.1-8B"
    # both tools name the default output after the directory ("." resolved); an existing one is refused
    (model / "out" / "Qwen2.5-0.5B-nf3-asym-g128").mkdir(parents=True)
    (model / "out" / "Qwen2.5-0.5B-nf3-asym-g128-qat-cakld").mkdir()
    assert "out/Qwen2.5-0.5B-nf3-asym-g128 already exists" in _tool_error(capsys, "convert", ["--model", "."])
    assert "out/Qwen2.5-0.5B-nf3-asym-g128-qat-cakld already exists" in _tool_error(
        capsys, "train", ["--model", ".", "--calib-random"])


def test_coordinator_auto_outside_a_cluster_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "CLOUD_TPU"))}
    r = subprocess.run([sys.executable, "-m", "afpq_jax.eval", "--model", str(FIXTURES / "llama_gqa"), "--no-ppl",
                        "--coordinator", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --coordinator auto found no cluster (SLURM, TPU pod, Open MPI); pass --coordinator HOST:PORT "
        "--num-processes N --process-id I")


def test_a_missing_peer_is_one_line_after_the_coordinator_timeout(tmp_path):
    """Was: 308 s of silence, then SIGABRT with a C++ stack trace. Now: what it waits for, then one line and exit
    status 2 after --coordinator-timeout."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--model", str(FIXTURES / "llama_gqa"),
                        "--out", str(tmp_path / "o"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", "0", "--coordinator-timeout", "3"], capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and time.time() - t < 60, r.stderr
    assert lines[0] == (f"waiting for all 2 processes at 127.0.0.1:{port} (this is process 0), up to 3 s "
                        f"(--coordinator-timeout)"), r.stderr
    assert len(lines) == 2 and lines[1].startswith("error: not every process joined within 3 s"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_calibration_batch_not_split_over_the_data_axis_is_warned(capsys):
    import jax
    data = jax.device_count() + 2  # no such mesh here: the run stops at the mesh, after the warning
    base = ["--model", str(FIXTURES / "llama_gqa"), "--method", "gptq", "--calib-random", "--calib-samples", "2",
            "--calib-seqlen", "8", "--mesh", f"data={data}", "--no-progress"]
    assert convert_cli.main(base) == 2
    err = capsys.readouterr().err
    assert f"needs {data} devices" in err.strip().splitlines()[-1]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --calib-batch-size 2 is not a multiple of the mesh's data size {data}, so "
                        f"calibration is not split over the devices; pass --calib-batch-size {data} (or a "
                        f"multiple)"]
    convert_cli.main([*base, "--calib-batch-size", str(2 * data)])
    assert "warning:" not in capsys.readouterr().err


def test_train_resume_of_a_missing_directory_creates_nothing(tmp_path, capsys):
    ckpt = tmp_path / "newdir"
    # options small enough that a run would get as far as the trainer (which creates the directory it is given)
    line = _tool_error(capsys, "train", ["--model", str(FIXTURES / "llama_gqa"), "--calib-random", "--calib-samples",
                                         "2", "--calib-seqlen", "8", "--samples", "2", "--prompt-len", "2",
                                         "--new-tokens", "6", "--data-cache", str(tmp_path / "cache"), "--resume",
                                         "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "o"),
                                         "--no-progress"])
    assert "nothing to resume" in line and str(ckpt) in line
    assert not ckpt.exists() and not (tmp_path / "o").exists()


def test_train_loss_summary_is_honest_for_short_runs():
    from afpq_jax.train import loss_summary
    assert loss_summary([3.0]) == "loss 3.0000 (1 step)"
    assert loss_summary([3.0, 2.0, 1.0]) == "loss 3.0000 (step 1) -> 1.0000 (step 3)"
    assert loss_summary([float(i) for i in range(10, 0, -1)]) == "loss 8.0000 (first 5) -> 3.0000 (last 5)"


def test_help_shows_each_default_once_and_true_output_names():
    from afpq_jax._src import cli
    for name in ("eval", "convert", "train"):
        parser = _tool(name).build_parser()
        assert parser.formatter_class is cli.HelpFormatter
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._expand_help(action)
            assert "(default: None)" not in text and text.lower().count("default") <= 1, (name, text)
        parser.format_help()
    out_help = {a.dest: a.help for a in _tool("train").build_parser()._actions}["out"]
    assert "-qat-<loss>" in out_help


@pytest.mark.parametrize("extra,saved,kept", [([], False, False), (["--save-progress"], False, False),
                                              (["--save-progress"], True, True)])
def test_interrupted_conversion_says_whether_progress_was_kept(tmp_path, capsys, monkeypatch, extra, saved, kept):
    """Only a run that saved a block says --resume continues it; one stopped before its first block leaves no
    progress directory (it said "--resume continues it" and left nothing to resume)."""
    def interrupted(*a, progress_dir=None, **kw):
        if progress_dir is not None:
            progress_dir.mkdir()
            if saved:
                (progress_dir / "progress.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(aq, "quantize_pretrained", interrupted)
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o"),
                             "--no-progress", *extra]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted; nothing was written to the output path")
    assert ("--resume continues it" in line) == kept, line
    assert (tmp_path / ".o.progress").exists() == kept
