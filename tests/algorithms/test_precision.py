"""Every calibration matmul (GPTQ, clipping search, AWQ search) asks for full float32 precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax as aq
from afpq_jax._src.algorithms import awq, clip, gptq
from tests.support import indefinite_hessian
from tests.support import FIXTURES, INT4, NF3


def _dot_precisions(jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _dot_precisions(sub)
    return out


def _all_highest(fn, *args) -> int:
    precisions = _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert precisions and all(p == highest for p in precisions), precisions
    return len(precisions)


def test_calibration_math_asks_for_full_float32_precision():
    """TPU / GPU run default-precision float32 matmuls as bf16 passes / TF32; every matmul of GPTQ, the clip
    search and AWQ's search must ask for HIGHEST (on CPU the numbers are the same either way)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    h = jnp.asarray(indefinite_hessian(64, 1.0), jnp.float32)
    fmt = aq.formats.get_format("nf3")
    perm, hinv, _ = gptq._factor(w, h, jnp.float32(0.01), bs=32, act_order=False)
    _all_highest(lambda w, h: gptq._gptq(w, h, perm, hinv, fmt=fmt, asym=True, g=16, sdt=jnp.float16,
                                         static=False, bs=32), w, h)
    x = jnp.asarray(rng.standard_normal((40, 64)), jnp.float32)
    grid = jnp.asarray(clip.shrink_grid(3), jnp.float32)
    _all_highest(lambda w, x: clip._search_separable(w, x, grid, fmt=fmt, g=16, sdt=jnp.float16, cols=8), w, x)
    pairs = jnp.stack([grid, grid], -1)
    _all_highest(lambda w, x: clip._search(w, x, pairs, fmt=aq.formats.get_format("int3"), asym=True, g=16,
                                           sdt=jnp.float16), w, x)
    from flax import nnx
    model = aq.load(FIXTURES / "llama_gqa")
    mlp = model.layers[0].mlp
    graphdef, state = nnx.split(mlp)
    xs = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    pos = jnp.zeros((1, 4), jnp.int32)
    refs = awq._outputs(graphdef, state, xs, pos, inspect="mlp")
    _all_highest(lambda s, xs: awq._outputs(graphdef, s, xs, pos, inspect="mlp"), state, xs)
    _all_highest(lambda s, xs: awq._search_losses(graphdef, s, xs, pos, jnp.ones(64), jnp.asarray([0.0, 0.5]), refs,
                                                  inspect="mlp", layer_paths=("gate_proj", "up_proj"),
                                                  schemes=(NF3, INT4)), state, xs)
