"""Ctrl-C and SIGTERM at any moment of a conversion (`afpq_jax._src.interrupts`): real processes, real signals.
Whatever the moment, the run exits 128 + the signal's number with one line saying what was kept, the input
and output directories are byte-for-byte as before (only a saved progress directory stays, on purpose), and no
staging, lock or spill file is left. Was: 91-4,202 lines of asyncio / orbax tracebacks and a 122 MB
``.out.partial-*`` that orbax's background writer recreated after the cleanup; SIGTERM left the spill file."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_outputs import snapshot
from tests.test_resume import _synthetic_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Big enough (a 16k vocabulary: 33 MB of float embeddings and head) that orbax's write takes a while."""
    return _synthetic_llama(tmp_path_factory.mktemp("m") / "model", hidden=256, layers=4, vocab=16384)


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
def test_a_signal_at_any_moment_leaves_inputs_and_outputs_as_they_were(tmp_path, model, moment, sig):
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
