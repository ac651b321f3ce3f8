"""Taps on a block's linear-layer inputs: the row-sampled capture equals the full one."""

import jax.numpy as jnp
import numpy as np

from afpq_jax._src.calibration import taps
from afpq_jax._src.io.sources import open_source
from afpq_jax._src.loading import CheckpointWeights
from afpq_jax._src.models import config_from_hf
from tests.support import FIXTURES


def test_sampled_inputs_equal_full_capture():
    """The clip search's row-sampled capture is the full capture indexed by the rows, in the rows' order."""
    src = open_source(FIXTURES / "llama_gqa")
    cfg = config_from_hf(src.config)
    block = CheckpointWeights(src, cfg).block(0, cfg, jnp.float32)
    x = np.random.default_rng(0).standard_normal((5, 12, cfg.hidden_size)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    rng = np.random.default_rng(1)
    rows = {"attn.v_proj": rng.choice(60, 17, replace=False), "mlp.down_proj": rng.choice(60, 9, replace=False),
            "mlp.up_proj": np.array([59, 0, 13])}
    full = {name: taps.layer_input(block, x, positions, 2, name) for name in rows}
    sampled = taps.sampled_inputs(block, x, positions, 2, rows)
    assert set(sampled) == set(rows)
    for name, idx in rows.items():
        np.testing.assert_array_equal(sampled[name], full[name].reshape(-1, full[name].shape[-1])[idx])
