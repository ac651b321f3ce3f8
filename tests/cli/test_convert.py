"""`python -m afpq_jax.convert`: flags, exit codes, one-line errors and what a run records."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax._src import checkpoint
from afpq_jax._src.calibration.data import sample_windows
from tests.support import FIXTURES, cli_error, copy_fixture


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert "does not exist" in cli_error(capsys, ["--model", str(tmp_path / "nope"), *out])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in cli_error(capsys, ["--model", str(tmp_path / "empty"), *out])

    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    assert "unsupported model_type 'gpt_neox'; supported: bloom, gemma3, gemma3_text, llama, mistral, qwen2, qwen3" in cli_error(
        capsys, ["--model", str(d), *out])
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 150}))
    assert "config.json does not match the weights" in cli_error(capsys, ["--model", str(d), *out])
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in cli_error(capsys, ["--model", str(d), *out])

    d2 = copy_fixture(tmp_path / "t")
    st = d2 / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert "truncated" in cli_error(capsys, ["--model", str(d2), *out])
    st.write_bytes(b"\xff" * 64)
    assert "corrupted" in cli_error(capsys, ["--model", str(d2), *out])

    assert "unknown format 'fp5'" in cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--format", "fp5",
                                                         *out])
    assert "tied" in cli_error(capsys, ["--model", str(FIXTURES / "bloom"), "--quantize-lm-head", *out])
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
    """`python -m afpq_jax.convert` itself: --help exits 0, a user error is one line with exit 2, a bug keeps its
    traceback with exit 1 (the in-process cases are test_cli_bad_flags_are_one_line_errors and
    test_cli_lets_bugs_keep_their_traceback)."""
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ["--model", "--format", "--group-size", "--sym", "--method", "--out", "--overwrite",
                 "--quantize-lm-head", "--scale-dtype", "--debug"]:
        assert flag in r.stdout
    r = subprocess.run([sys.executable, "-m", "afpq_jax.convert", "--model", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr
    code = ("import sys, afpq_jax as aq\nfrom afpq_jax import convert\n"
            "def bug(*a, **k):\n    return {}['missing key']\n"
            "aq.quantize_pretrained = bug\n"
            f"sys.exit(convert.main(['--model', {str(FIXTURES / 'llama_gqa')!r}, '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'missing key'" in r.stderr


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


def test_rules_file_flag_conflicts_and_missing_file(tmp_path, capsys):
    base = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o")]
    assert "does not exist" in cli_error(capsys, base + ["--rules", str(tmp_path / "nope.json")])
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"pattern": ".*", "scheme": {"format": "nf3"}}]))
    assert "--rules replaces --format" in cli_error(capsys, base + ["--rules", str(f), "--format", "int4"])
    f.write_text(json.dumps([{"pattern": "q_proj", "scheme": {"format": "nf3"}}]))
    assert "the rules quantize no layer" in cli_error(capsys, base + ["--rules", str(f)])


@pytest.mark.parametrize("exc", [KeyError, TypeError, RuntimeError])
def test_cli_lets_bugs_keep_their_traceback(tmp_path, monkeypatch, exc):
    def bug(*a, **kw):
        raise exc("internal")

    monkeypatch.setattr(aq, "quantize_pretrained", bug)
    with pytest.raises(exc):
        convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(tmp_path / "o"), "--no-progress"])


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


@pytest.mark.parametrize("extra,message", [
    (["--format", "nf4", "--act-bits", "8"], "no exact int8 representation"),
    (["--format", "int4", "--act-bits", "8", "--act-thresholds", "150,15"], "0 <= lo <= hi"),
    (["--format", "int4", "--act-bits", "8", "--act-thresholds", "15"], "LO,HI"),
    (["--format", "int4", "--act-scheme", "fptq"], "needs --act-bits 8"),
    (["--format", "int4", "--act-bits", "8", "--act-scheme", "static", "--smoothquant-alpha", "0.4"],
     "applies to --act-scheme smoothquant"),
    (["--format", "int4", "--act-bits", "8", "--act-scheme", "dynamic", "--act-rule", "relative"],
     "applies to --act-scheme fptq"),
    (["--format", "int4", "--act-bits", "8", "--act-rule", "relative", "--act-max-token-ratio", "0.5"],
     "max_token_ratio must be at least 1"),
    (["--format", "int4", "--act-bits", "8", "--act-thresholds", "2,8", "--act-max-token-ratio", "4"],
     "--act-max-token-ratio applies to the relative rule"),
    (["--format", "int4", "--act-bits", "8", "--act-rule", "relative", "--act-thresholds", "2,8"],
     "thresholds apply to scheme 'fptq' with rule 'absolute'"),
])
def test_bad_activation_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    line = cli_error(capsys, ["--model", str(FIXTURES / "llama_gqa"), "--calib-random", "--calib-samples", "2",
                               "--calib-seqlen", "8", "--out", str(out), "--no-progress", *extra])
    assert message in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_integer_scales_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress", "--integer-scales"]
    assert "no integer group scales" in cli_error(capsys, [*base, "--format", "nf4"])
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"pattern": ".*", "scheme": {"format": "int4"}}]))
    assert "--rules replaces --integer-scales" in cli_error(capsys, [*base, "--rules", str(rules)])
    assert not out.exists()


def test_default_output_names_differ_by_method():
    from afpq_jax.convert import _method_tag, build_parser
    tags = {tuple(argv): _method_tag(build_parser().parse_args(argv))
            for argv in ([], ["--clip"], ["--method", "gptq"], ["--method", "awq"], ["--method", "awq", "--no-clip"])}
    assert tags[()] == ""  # the demo's name is unchanged
    assert len(set(tags.values())) == len(tags), tags


@pytest.mark.parametrize("flags,rule,thresholds", [
    ([], "relative", [15.0, 150.0]),  # the default rule: the one that holds on SmolLM2 and Gemma 3
    (["--act-rule", "absolute"], "absolute", [15.0, 150.0]),  # the paper's, one flag away
    (["--act-thresholds", "2,8"], "absolute", [2.0, 8.0]),  # thresholds are the absolute rule's
])
def test_act_rule_default_and_the_papers_thresholds(flags, rule, thresholds):
    args = convert_cli.build_parser().parse_args(["--format", "int4", "--act-bits", "8", *flags])
    policy = convert_cli._activations(args)
    assert policy.scheme == "fptq" and policy.rule == rule and policy.to_json()["thresholds"] == thresholds
