"""What the three command-line tools share (`afpq_jax._src.cli`): bad flags as one line, help, default output names,
--mesh."""

from __future__ import annotations

import pytest

from afpq_jax._src.cli import mesh_spec
from tests.support import cli_tool, tool_error
from tests.support import FIXTURES, copy_fixture


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
    ("convert", ["--group-size", "0.5"], "group size"),
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
    assert message in tool_error(capsys, tool, [*base, *argv])
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
        assert message in tool_error(capsys, tool, [*argv, "--no-progress", *(
            ["--out", str(tmp_path / "o")] if tool == "convert" else [])])


def test_default_output_names_keep_dots_and_resolve_directories(tmp_path, monkeypatch, capsys):
    from afpq_jax._src import cli
    model = copy_fixture(tmp_path, "llama_gqa")
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
    assert "out/Qwen2.5-0.5B-nf3-asym-g128 already exists" in tool_error(capsys, "convert", ["--model", "."])
    assert "out/Qwen2.5-0.5B-nf3-asym-g128-qat-cakld already exists" in tool_error(
        capsys, "train", ["--model", ".", "--calib-random"])


def test_help_shows_each_default_once_and_true_output_names():
    from afpq_jax._src import cli
    for name in ("eval", "convert", "train"):
        parser = cli_tool(name).build_parser()
        assert parser.formatter_class is cli.HelpFormatter
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._expand_help(action)
            assert "(default: None)" not in text and text.lower().count("default") <= 1, (name, text)
        parser.format_help()
    out_help = {a.dest: a.help for a in cli_tool("train").build_parser()._actions}["out"]
    assert "-qat-<loss>" in out_help


def test_mesh_flag_parsing():
    assert mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    for bad in ("model", "tensor=2", "model=0", "model=2,model=2"):
        with pytest.raises(Exception, match="is not a mesh"):
            mesh_spec(bad)
