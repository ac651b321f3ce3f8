"""Calibration activations beyond the memory budget: a file read and written by rows, the same result."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from tests.support import FIXTURES


def test_a_memory_budget_keeps_the_activations_in_a_file_with_the_same_result(tmp_path, monkeypatch):
    """Activations beyond half of ``max_memory`` live in an ``.npy`` file under ``spill_dir`` (seen while the run
    uses it), the model is the one an in-RAM run gives, and the file is gone afterwards. (The peak RSS this saves
    is measured by ``python -m benchmarks.spill_memory``.)"""
    from afpq_jax._src.calibration import spill as spill_module
    cal = aq.Calibration(random=True, samples=4, seqlen=16, batch_size=2)
    scheme = aq.QuantScheme.create("int4", group_size=16)
    opened = []
    real_init = spill_module.SpilledArray.__init__

    def spy(self, path, shape):
        real_init(self, path, shape)
        opened.append((Path(path), tuple(shape), Path(path).stat().st_size))

    monkeypatch.setattr(spill_module.SpilledArray, "__init__", spy)
    in_ram = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, method="gptq", calibration=cal, progress=False)
    assert opened == []
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    spilled = aq.quantize_pretrained(FIXTURES / "llama_gqa", scheme, method="gptq", calibration=cal,
                                     progress=False, max_memory=1024, spill_dir=spill_dir)
    hidden = aq.load(FIXTURES / "llama_gqa").cfg.hidden_size
    assert [(p.parent.parent, shape) for p, shape, _ in opened] == [(spill_dir, (4, 16, hidden))]
    assert opened[0][2] >= 4 * 16 * hidden * 4  # the whole float32 buffer is in the file, not in RAM
    for x, y in zip(jax.tree.leaves(nnx.state(in_ram)), jax.tree.leaves(nnx.state(spilled))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert list(spill_dir.iterdir()) == []


@pytest.mark.parametrize("rows", [slice(0, 3), slice(2, 7), slice(5, None), slice(None), slice(6, 2)])
def test_a_spilled_array_reads_and_writes_rows_like_numpy(tmp_path, rows):
    from afpq_jax._src.calibration.spill import SpilledArray
    (tmp_path / "d").mkdir()
    ref = np.zeros((7, 3, 2), np.float32)
    arr = SpilledArray(tmp_path / "d" / "x.npy", ref.shape)
    arr[:] = 0
    values = np.arange(ref[rows].size, dtype=np.float32).reshape(ref[rows].shape) + 1
    arr[rows], ref[rows] = values, values
    np.testing.assert_array_equal(arr[:], ref)
    np.testing.assert_array_equal(arr[rows], ref[rows])
    with pytest.raises(TypeError, match="sliced along axis 0 only"):
        arr[1]
    with pytest.raises(TypeError, match="sliced along axis 0 only"):
        arr[::2]
    arr.close()
    assert not (tmp_path / "d").exists()
