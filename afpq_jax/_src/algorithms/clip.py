"""Two-sided clipping search (BitDistiller's asymmetric clipping; AWQ's auto_clip made two-sided).

For every output column and group, shrink the negative extreme by ``r_neg`` and the positive extreme by
``r_pos`` (each from 1.0 down to ``1 - (steps-1) * step``, 1.0 .. 0.55 by default) and keep the pair that
minimises the group's contribution to the layer output error on sampled calibration tokens:
``mean_t (sum_{k in group} x[t, k] * (w[k, n] - q[k, n]))^2``. For AFPQ this sets ``s_pos`` and ``s_neg``
independently. Symmetric formats have one scale, so the search is one-dimensional (both sides shrink alike).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.formats import Format, get_format
from afpq_jax._src.quantizer import decode, encode, group_params, to_groups


def shrink_grid(steps: int = 10, step: float = 0.05) -> np.ndarray:
    return np.asarray([1.0 - i * step for i in range(steps)], np.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "asym", "g", "sdt"))
def _search(w, x, ratio_pairs, *, fmt: Format, asym: bool, g: int, sdt):
    wg = to_groups(w.astype(jnp.float32), g)  # (G, g, N)
    t = x.shape[0]
    xg = to_groups(x.astype(jnp.float32).T, g).reshape(-1, g, t)  # (G, g, T): zero rows pad a short group
    lo0, hi0 = jnp.min(wg, axis=1, keepdims=True), jnp.max(wg, axis=1, keepdims=True)

    def error(pair):
        params = group_params(fmt, asym, lo0 * pair[0], hi0 * pair[1], sdt)
        d = wg - decode(fmt, asym, encode(fmt, asym, wg, params), params)
        e = jnp.einsum("Gkt,GkN->GtN", xg, d, preferred_element_type=jnp.float32)
        return jnp.mean(e * e, axis=1)  # (G, N)

    def step(best, pair):
        err = error(pair)
        better = err < best[0]
        return (jnp.where(better, err, best[0]), jnp.where(better, pair[0], best[1]),
                jnp.where(better, pair[1], best[2])), None

    init = (error(ratio_pairs[0]), jnp.full(lo0.shape[::2], ratio_pairs[0, 0]),
            jnp.full(lo0.shape[::2], ratio_pairs[0, 1]))
    (best_err, r_neg, r_pos), _ = jax.lax.scan(step, init, ratio_pairs[1:])
    return r_neg[:, None, :], r_pos[:, None, :], best_err


def clip_search(kernel: jax.Array, x: jax.Array, fmt: str | Format, *, group_size: int | None = 128,
                asym: bool = True, scale_dtype=jnp.float16, steps: int = 10, step: float = 0.05
                ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """Best per-group shrink ratios ``(r_neg, r_pos)`` (each ``(G, 1, N)``, for `quantize(clip_ratios=...)`)
    and the minimised error ``(G, N)``. ``x`` holds calibration inputs ``(T, K)`` of this layer.

    The unclipped pair (1, 1) is in the grid and a pair only replaces the incumbent when strictly better, so
    the result never has a larger error than no clipping.
    """
    fmt = get_format(fmt)
    k = kernel.shape[0]
    g = k if group_size is None else min(group_size, k)
    grid = shrink_grid(steps, step)
    if asym:
        pairs = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    else:
        pairs = np.stack([grid, grid], -1)
    r_neg, r_pos, err = _search(jnp.asarray(kernel), jnp.asarray(x).reshape(-1, k), jnp.asarray(pairs),
                                fmt=fmt, asym=asym, g=g, sdt=jnp.dtype(scale_dtype))
    return (r_neg, r_pos), err


def group_output_error(kernel, qkernel, x, group_size: int | None) -> np.ndarray:
    """``mean_t (sum_{k in group} x (w - q))^2`` per (group, column), in float64 numpy (for tests/reports)."""
    w, q = np.asarray(kernel, np.float64), np.asarray(qkernel, np.float64)
    x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    k = w.shape[0]
    g = k if group_size is None else min(group_size, k)
    out = []
    for s in range(0, k, g):
        e = x[:, s:s + g] @ (w[s:s + g] - q[s:s + g])
        out.append(np.mean(e * e, axis=0))
    return np.stack(out)
