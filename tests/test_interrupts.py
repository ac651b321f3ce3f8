"""Ctrl-C and SIGTERM at any moment of a conversion (`afpq_jax._src.interrupts`): real processes, real signals;
nothing is left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.spill_memory import write_model
from tests.support import snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Big enough (a 16k vocabulary: 33 MB of float embeddings and head) that orbax's write takes a while."""
    return write_model(tmp_path_factory.mktemp("m") / "model", hidden=256, layers=4, vocab=16384)


@pytest.fixture
def sigint_at_its_default():
    """Ctrl-C at its default action for the test and the processes it starts. A run started in the background
    (``make test &``, a CI step) inherits SIGINT ignored, the xdist workers and their children too, and the
    library rightly leaves an ignored SIGINT alone (test_ignored_and_custom_handlers_are_left_alone); a test that
    sends SIGINT must not depend on how the suite was launched. (A Python handler becomes the default action in a
    child at exec: children start with Python's own KeyboardInterrupt handler.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    t = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the moment to signal it"
        assert time.time() - t < timeout
        time.sleep(0.002)


# moment: when the signal is sent. "blocks": as the first block is quantized; "staging": the moment the staging
# directory appears (orbax is imported and starts); "writing": while orbax writes the arrays; "progress": after a
# block's progress was saved, with spilled activations (--max-memory) in --spill-dir.
@pytest.mark.parametrize("moment,sig", [("blocks", signal.SIGINT), ("staging", signal.SIGTERM),
                                        ("writing", signal.SIGINT), ("writing", signal.SIGTERM),
                                        ("progress", signal.SIGTERM)])
def test_a_signal_at_any_moment_leaves_inputs_and_outputs_as_they_were(tmp_path, model, moment, sig,
                                                                     sigint_at_its_default):
    work, spill = tmp_path / "work", tmp_path / "spill"
    work.mkdir()
    spill.mkdir()
    out = work / "q"
    args = [sys.executable, "-m", "afpq_jax.convert", "--model", str(model), "--out", str(out), "--format", "int4",
            "--no-progress"]
    if moment == "progress":
        args += ["--method", "gptq", "--calib-random", "--calib-samples", "4", "--calib-seqlen", "32",
                 "--max-memory", "64K", "--spill-dir", str(spill), "--save-progress"]
    before = snapshot(model, work)
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    staging = str(work / ".q.partial-*")
    if moment == "blocks":
        while "->" not in proc.stderr.readline():  # the plan is printed, the blocks begin
            assert proc.poll() is None
    elif moment == "staging":
        _wait_for(proc, lambda: glob.glob(staging))
    elif moment == "writing":
        _wait_for(proc, lambda: glob.glob(staging + "/params*"))
    else:
        _wait_for(proc, lambda: (work / ".q.progress" / "progress.json").exists())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig, err
    assert lines[-1].startswith("interrupted; nothing was written to the output path"), err
    assert "Traceback" not in err and "ERROR" not in err and "Exception" not in err, err
    assert not any(line.startswith(("interrupted", "error")) for line in lines[:-1]), err
    time.sleep(0.5)  # orbax's writer, had it survived, would recreate the staging directory now
    after = snapshot(model, work)
    if moment == "progress":
        assert "--resume continues it" in lines[-1]
        kept = {k for k in after if k.startswith(str(work / ".q.progress"))}
        assert {Path(k).name for k in kept} >= {".q.progress", "progress.json", "block_0000.npz"}
        after = {k: v for k, v in after.items() if k not in kept}
    assert after == before
    assert list(spill.iterdir()) == []


# ---- the handler itself, in this process -------------------------------------------------------------------

def test_a_signal_inside_a_gc_callback_is_delivered_again_outside(sigint_at_its_default):
    """Python swallows exceptions raised in garbage-collector callbacks (JAX registers one): the Ctrl-C that
    landed there was lost and the conversion ran on to the end (one Ctrl-C in six, found by a review)."""
    import gc
    from afpq_jax._src import interrupts
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.stop_on_signals():
                gc.collect()
                time.sleep(5)  # the re-delivery lands here
    finally:
        gc.callbacks.remove(callback)
    assert fired


def test_an_interrupt_that_surfaces_as_another_error_is_still_an_interrupt(capsys):
    """A Ctrl-C inside a C extension's first import comes out as ``ImportError: initialization failed`` (seen
    with orbax's tensorstore): a traceback and exit 1 before."""
    from afpq_jax._src import cli, interrupts

    def main() -> int:
        try:
            raise interrupts.Interrupted(signal.SIGINT)
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    assert cli.run(main, debug=False) == 130
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED


def test_ignored_and_custom_handlers_are_left_alone():
    """``cmd &`` in a script ignores SIGINT, and an application may have its own SIGTERM handler: neither is
    taken over."""
    from afpq_jax._src import interrupts

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, mine)
    try:
        with interrupts.stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    with interrupts.stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


def test_a_signal_while_the_result_is_renamed_into_place_says_it_was_written(tmp_path, capsys, monkeypatch,
                                                                              sigint_at_its_default):
    """The signal is held during the rename and delivered after it: the checkpoint is complete, and the line
    must not say "nothing was written"."""
    from afpq_jax import convert as convert_cli
    from afpq_jax._src import checkpoint
    from afpq_jax._src.io import outputs
    real = outputs.rename_no_replace

    def rename_and_signal(src, dst, what="output"):
        os.kill(os.getpid(), signal.SIGINT)
        real(src, dst, what)

    monkeypatch.setattr(outputs, "rename_no_replace", rename_and_signal)
    out = tmp_path / "o"
    assert convert_cli.main(["--model", str(Path(__file__).parent / "fixtures" / "llama_gqa"), "--out", str(out),
                             "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted after the checkpoint was written: {out} is complete")
    assert checkpoint.is_converted_checkpoint(out)
