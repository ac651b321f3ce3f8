"""Outputs never hold or replace a user's files (`afpq_jax._src.io.outputs`): checks before any work, --overwrite,
locks, leftovers, full disks."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import afpq_jax as aq
from afpq_jax import convert as convert_cli
from afpq_jax import train as train_cli
from afpq_jax._src import checkpoint
from afpq_jax._src.errors import NoSpaceError, OutputBusyError, OutputError, OutputExistsError
from afpq_jax._src.io import outputs
from tests.support import FIXTURES, HOLD, snapshot


def _model(tmp_path: Path, name: str = "model") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / "llama_gqa", d)
    return d


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Refusals must come before any work: quantizing at all fails the test."""
    def fail(*a, **kw):
        raise AssertionError("the run got as far as quantizing")
    monkeypatch.setattr(aq, "quantize_pretrained", fail)
    monkeypatch.setattr(aq, "train_qat", fail)


# ---- outputs never hold the inputs ----------------------------------------------------------------------------

def test_out_equal_to_the_model_is_refused_and_the_model_kept(tmp_path, capsys, no_work):
    """Was: `convert --model M --out M --overwrite` deleted the model's files and exited 0."""
    model = _model(tmp_path)
    before = snapshot(tmp_path)
    assert convert_cli.main(["--model", str(model), "--out", str(model), "--overwrite", "--no-progress"]) == 2
    assert "is the input" in _one_error_line(capsys)
    assert convert_cli.main(["--model", str(model), "--out", str(tmp_path), "--overwrite", "--no-progress"]) == 2
    assert "contains the input" in _one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_out_equal_to_the_working_directory_is_refused(tmp_path, capsys, monkeypatch, no_work):
    """Was: from inside a directory, `--model model --out . --overwrite` deleted everything there, wrote the
    checkpoint, then exited 2 with "No such file or directory"."""
    work = tmp_path / "work"
    work.mkdir()
    _model(tmp_path)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert convert_cli.main(["--model", "../model", "--out", ".", "--overwrite", "--no-progress"]) == 2
    assert "is the working directory" in _one_error_line(capsys)
    assert convert_cli.main(["--model", "../model", "--out", "..", "--overwrite", "--no-progress"]) == 2
    assert "contains the input ../model" in _one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_library_save_refuses_the_source_model(tmp_path):
    model = _model(tmp_path)
    q = aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16), progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        aq.save(q, model, overwrite=True)
    assert snapshot(tmp_path) == before
    aq.save(q, tmp_path / "q")  # a new directory is fine; re-saving a loaded checkpoint onto itself is not
    with pytest.raises(OutputError, match="is the input"):
        aq.save(aq.load(tmp_path / "q"), tmp_path / "q", overwrite=True)


def test_out_inside_the_model_directory_is_allowed():
    outputs.check_separate(FIXTURES / "llama_gqa" / "quantized", [FIXTURES / "llama_gqa"], "--out")
    with pytest.raises(OutputError, match="working directory|file-system root"):
        outputs.check_separate("/", [], "--out")


def test_scratch_directories_must_not_overlap_the_model_or_the_output(tmp_path, capsys, no_work):
    model = _model(tmp_path)
    base = ["--model", str(model), "--no-progress"]
    assert convert_cli.main([*base, "--out", str(tmp_path / "o"), "--max-memory", "1G", "--spill-dir",
                             str(model)]) == 2
    assert "--spill-dir" in _one_error_line(capsys)
    # --checkpoint-dir is orbax's own directory: not the model, not in --out, not around them; a cache only
    # must not lie inside them
    for flag, places in (("--checkpoint-dir", (model, tmp_path / "o" / "ckpt", tmp_path)),
                         ("--data-cache", (model / "cache", tmp_path / "o" / "cache"))):
        for place in places:
            assert train_cli.main([*base, "--calib-random", "--out", str(tmp_path / "o"), flag, str(place)]) == 2
            assert flag in _one_error_line(capsys)
    assert train_cli.main([*base, "--calib-random", "--out", str(tmp_path / "o"), "--history",
                           str(model / "h.jsonl")]) == 2
    assert "pass a file outside the model" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_links_are_followed_before_dot_dot(tmp_path):
    """``link/../ck`` is ``models/ck`` when ``link -> models/deep``: checked as the kernel resolves it."""
    (tmp_path / "models" / "deep").mkdir(parents=True)
    (tmp_path / "models" / "ck").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models" / "deep")
    with pytest.raises(OutputError, match="is the input"):
        outputs.check_separate(tmp_path / "link" / ".." / "ck", [tmp_path / "models" / "ck"], "--out")


# ---- --overwrite replaces only afpq-jax outputs ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["foreign directory", "plain file", "link to a checkpoint"])
def test_overwrite_refuses_what_afpq_jax_did_not_write(tmp_path, capsys, kind, no_work):
    out = tmp_path / "o"
    if kind == "foreign directory":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif kind == "plain file":
        out.write_text("not a checkpoint")
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / checkpoint.QUANT_CONFIG).write_text(json.dumps({"checkpoint_format": "afpq-jax/1"}))
        out.symlink_to(tmp_path / "real")
    before = snapshot(tmp_path)
    args = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]
    assert convert_cli.main(args) == 2
    assert "already exists; choose another --out or pass --overwrite" in _one_error_line(capsys)
    assert convert_cli.main([*args, "--overwrite"]) == 2
    assert "--overwrite replaces only afpq-jax outputs" in _one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_afpq_checkpoint_and_an_empty_directory(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    args = ["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress", "--format", "int4",
            "--group-size", "16"]
    assert convert_cli.main([*args, "--overwrite"]) == 0 and checkpoint.is_converted_checkpoint(out)
    assert json.loads((out / checkpoint.QUANT_CONFIG).read_text())["layers"]["layers.0.attn.q_proj"]["format"] == \
        "int4"
    assert convert_cli.main([*args[:-4], "--overwrite", "--format", "nf3"]) == 0
    assert json.loads((out / checkpoint.QUANT_CONFIG).read_text())["layers"]["layers.0.attn.q_proj"]["format"] == \
        "nf3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock, staging or old directory left


# ---- one writer per output path -------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_output_fails_at_once(tmp_path, capsys, no_work):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(out), "--no-progress"]) == 2
        line = _one_error_line(capsys)
        assert f"another afpq-jax run (pid {holder.pid}) is writing --out {out}" in line
        with pytest.raises(OutputBusyError):
            with outputs.claim(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with outputs.claim(out):  # the lock dies with its holder (even one killed by SIGKILL)
        with outputs.claim(out):  # and is re-entrant within a process
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the created parent stays, the lock file goes


def test_two_concurrent_conversions_to_one_output_lose_nothing(tmp_path):
    """Was: both exited 0 and printed their output path, one result silently replaced."""
    out = tmp_path / "o"
    procs = [subprocess.Popen([sys.executable, "-m", "afpq_jax.convert", "--model", str(FIXTURES / "llama_gqa"),
                               "--out", str(out), "--no-progress", "--format", fmt, "--group-size", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fmt in ("int4", "nf3")]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    (rc0, won_out, _), = [r for r in results if r[0] == 0]
    (_, _, lost_err), = [r for r in results if r[0] == 2]
    errors = [line for line in lost_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("is writing --out" in errors[0] or "already exists" in errors[0]), lost_err
    assert str(out) in won_out
    winner = "int4" if results[0][0] == 0 else "nf3"
    assert json.loads((out / checkpoint.QUANT_CONFIG).read_text())["layers"]["layers.0.attn.q_proj"]["format"] \
        == winner
    assert aq.load(out) is not None and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_the_final_rename_never_replaces_a_directory_that_appeared_meanwhile(tmp_path):
    """A program that ignores the lock creates --out between publish's check and its rename: the no-replace
    rename refuses (renameat2's RENAME_NOREPLACE on Linux), and both directories stay as they were."""
    staging, out = tmp_path / ".o.partial-0000beef", tmp_path / "o"
    staging.mkdir()
    (staging / "ours.txt").write_text("ours")
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        outputs.rename_no_replace(staging, out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and [p.name for p in staging.iterdir()] == ["ours.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # plain rename(2) would replace an empty directory without a word
    with pytest.raises(OutputExistsError):
        outputs.rename_no_replace(staging, empty)
    q = aq.quantize_pretrained(FIXTURES / "llama_gqa", aq.QuantScheme.create("int4", group_size=16), progress=False)
    with outputs.claim(tmp_path / "late"):
        (tmp_path / "late").mkdir()  # appears after the claim's checks
        (tmp_path / "late" / "theirs.txt").write_text("theirs")
        with pytest.raises(OutputExistsError, match="already exists"):
            aq.save(q, tmp_path / "late")
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["theirs.txt"]


# ---- leftovers of killed runs ---------------------------------------------------------------------------------

def _afpq_dir(path: Path, *, complete: bool = True) -> Path:
    (path / "params").mkdir(parents=True)
    if complete:
        (path / checkpoint.QUANT_CONFIG).write_text(json.dumps({"checkpoint_format": "afpq-jax/1"}))
    return path


def test_leftovers_of_killed_runs_are_swept_with_a_line(tmp_path, caplog):
    out = tmp_path / "o"
    (tmp_path / ".o.partial-0badf00d" / "params").mkdir(parents=True)
    _afpq_dir(tmp_path / ".o.old-12345678")
    (tmp_path / ".other.partial-00000001").mkdir()  # another output's: not ours to touch
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        with outputs.claim(out, overwrite=True):
            pass
    # an interrupted --overwrite had moved the old checkpoint aside and not yet put the new one in place
    assert out.is_dir() and "put back" in caplog.text
    assert "removed 1 leftover(s)" in caplog.text and ".o.partial-0badf00d" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-00000001", "o"]


def test_the_sweep_never_takes_another_outputs_files(tmp_path):
    """``.a.old-1.partial-*``, ``.a.old-1.lock`` and ``.a.old-1.progress`` belong to an output named ``a.old-1``;
    a prefix match for ``a``'s leftovers took them (a live run's staging directory and lock among them)."""
    theirs = [".a.old-1.partial-deadbeef", ".a.old-1.progress", ".a.partial-1.old-deadbeef"]
    for name in theirs:
        _afpq_dir(tmp_path / name)
    (tmp_path / ".a.old-1.lock").write_text("123")
    before = snapshot(tmp_path)
    with outputs.claim(tmp_path / "a"):
        pass
    assert snapshot(tmp_path) == before


def test_a_half_deleted_or_foreign_state_is_never_put_back_or_lost(tmp_path, caplog):
    """An ``.old-*`` whose deletion was cut short (SIGKILL) is no checkpoint: swept, never put back. An ``.old-*``
    beside an --out that is not afpq-jax's is the user's previous checkpoint: kept, with a line."""
    out = tmp_path / "o"
    _afpq_dir(tmp_path / ".o.old-0000aaaa", complete=False)
    with outputs.claim(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    _afpq_dir(tmp_path / ".o.old-0000bbbb")
    with caplog.at_level(logging.WARNING, logger="afpq_jax"), pytest.raises(OutputExistsError):
        with outputs.claim(out):
            pass
    assert "kept .o.old-0000bbbb" in caplog.text and (tmp_path / ".o.old-0000bbbb").is_dir()


# ---- writability and full disks -------------------------------------------------------------------------------

def test_an_unwritable_output_is_found_before_any_work(tmp_path, capsys, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(blocker / "o"),
                             "--no-progress"]) == 2
    assert "is a file, not a directory" in _one_error_line(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    with _mount(ro, "-o", "ro,size=1m") as mounted:
        assert convert_cli.main(["--model", str(FIXTURES / "llama_gqa"), "--out", str(mounted / "o"),
                                 "--no-progress"]) == 2
        assert "cannot create files in" in _one_error_line(capsys)


class _mount:
    """A tmpfs mounted at ``path`` for the test (skips where mounting is not permitted)."""

    def __init__(self, path: Path, *options: str):
        self.path, self.options = path, options

    def __enter__(self) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", *self.options, "tmpfs", str(self.path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(tmp_path, capsys, monkeypatch):
    """Was: 329 lines and four tracebacks (orbax's RESOURCE_EXHAUSTED), and "65536 requested and 42976 written"
    while saving progress. Checked before writing, and recognised if the write fails anyway."""
    small = tmp_path / "small"
    small.mkdir()
    args = ["--model", str(FIXTURES / "llama_gqa"), "--no-progress", "--format", "int4", "--group-size", "16"]
    with _mount(small, "-o", "size=64k"):
        before = snapshot(small)
        assert convert_cli.main([*args, "--out", str(small / "o")]) == 2
        line = _one_error_line(capsys)
        assert f"no space left on the device of {small / 'o'} (about" in line and "needed" in line, line
        assert snapshot(small) == before
        monkeypatch.setattr(outputs, "require_space", lambda *a, **kw: None)  # orbax meets the full disk itself
        assert convert_cli.main([*args, "--out", str(small / "o")]) == 2
        assert "no space left on the device" in _one_error_line(capsys)
        assert snapshot(small) == before
        # saving progress: numpy's short write on a nearly full disk
        filler = small / "filler"
        filler.write_bytes(b"\0" * (64 * 1024 - 20 * 1024))
        assert convert_cli.main([*args, "--out", str(small / "p"), "--save-progress"]) == 2
        line = _one_error_line(capsys)
        assert f"no space left on the device of {small / '.p.progress' / 'block_0000.npz'} (about" in line, line
        filler.unlink()
        assert sorted(p.name for p in small.iterdir()) == []


def test_enospc_from_the_operating_system_is_named():
    e = OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")
    full = outputs.as_no_space(e, "/tmp")
    assert isinstance(full, NoSpaceError) and "no space left on the device of /tmp" in str(full)
    assert outputs.as_no_space(ValueError("bad value"), "/tmp") is None
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = ValueError("RESOURCE_EXHAUSTED: No space left on device")
    assert isinstance(outputs.as_no_space(wrapped, "/tmp"), NoSpaceError)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def half(p: Path) -> None:
        p.write_text("ne")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        outputs.atomic_write(target, half)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    outputs.atomic_write_text(target, "new")
    assert target.read_text() == "new"
