"""Two-sided clipping search (BitDistiller's asymmetric clipping; AWQ's auto_clip made two-sided).

For every output column and group, shrink the negative extreme by ``r_neg`` and the positive extreme by
``r_pos`` (each from 1.0 down to ``1 - (steps-1) * step``, 1.0 .. 0.55 by default) and keep the pair that
minimises the group's contribution to the layer output error on sampled calibration tokens:
``mean_t (sum_{k in group} x[t, k] * (w[k, n] - q[k, n]))^2``. For AFPQ this sets ``s_pos`` and ``s_neg``
independently. Symmetric formats have one scale, so the search is one-dimensional (both sides shrink alike).

For asymmetric FP/NF formats the search is *separable*: a negative weight's code depends only on ``s_neg`` and a
positive one's only on ``s_pos``, so a group's output error splits as ``e = e_neg(r_neg) + e_pos(r_pos)`` and
``mean(e^2) = mean(e_neg^2) + mean(e_pos^2) + 2 mean(e_neg e_pos)``: 2 x steps error products plus one cross
term instead of steps^2 error products (same minimiser; about 5x less work for the 10 x 10 grid). INT's
min/max affine scale and zero point mix both sides, so INT keeps the exhaustive grid.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from afpq_jax._src.sharding import column_sharded
from afpq_jax._src.formats import Format, get_format
from afpq_jax._src import validation
from afpq_jax._src.errors import InputError
from afpq_jax._src.quantizer import (check_global_scale, check_group_size, decode, encode, global_scale_of,
                                     group_params, to_groups)

if TYPE_CHECKING:
    from afpq_jax._src.calibration.method import BlockContext


def shrink_grid(steps: int = 10, step: float = 0.05) -> np.ndarray:
    return np.asarray([1.0 - i * step for i in range(steps)], np.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "asym", "g", "sdt"))
def _search(w, x, ratio_pairs, global_scale=None, *, fmt: Format, asym: bool, g: int, sdt):
    with jax.default_matmul_precision("highest"):  # TPU / GPU would otherwise use bf16 / TF32 passes
        return _search_impl(w, x, ratio_pairs, global_scale, fmt=fmt, asym=asym, g=g, sdt=sdt)


def _given(gs, global_scale):
    """The tensor's own global scale ``gs``, or the caller's (shared) one in its shape."""
    return gs if gs is None or global_scale is None else jnp.asarray(global_scale, jnp.float32).reshape(gs.shape)


def _search_impl(w, x, ratio_pairs, global_scale=None, *, fmt: Format, asym: bool, g: int, sdt):
    wg = to_groups(w.astype(jnp.float32), g)  # (G, g, N)
    t = x.shape[0]
    xg = to_groups(x.astype(jnp.float32).T, g).reshape(-1, g, t)  # (G, g, T): zero rows pad a short group
    lo0, hi0 = jnp.min(wg, axis=1, keepdims=True), jnp.max(wg, axis=1, keepdims=True)
    gs = _given(global_scale_of(fmt, asym, lo0, hi0, sdt), global_scale)  # the unclipped weight's, as `quantize`

    def error(pair):
        params = group_params(fmt, asym, lo0 * pair[0], hi0 * pair[1], sdt, gs)
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


@functools.partial(jax.jit, static_argnames=("fmt", "g", "sdt", "cols"))
def _search_separable(w, x, grid, global_scale=None, *, fmt: Format, g: int, sdt, cols: int):
    """`_search` for asymmetric FP/NF (pairs = grid x grid, r_neg major), ``cols`` output columns at a time."""
    with jax.default_matmul_precision("highest"):
        return _search_separable_impl(w, x, grid, global_scale, fmt=fmt, g=g, sdt=sdt, cols=cols)


def _search_separable_impl(w, x, grid, global_scale=None, *, fmt: Format, g: int, sdt, cols: int):
    n = w.shape[1]
    n_pad = -(-n // cols) * cols
    wg = to_groups(jnp.pad(w.astype(jnp.float32), ((0, 0), (0, n_pad - n))), g)  # (G, g, Np); zero columns
    t = x.shape[0]
    xg = to_groups(x.astype(jnp.float32).T, g).reshape(-1, g, t)  # (G, g, T)
    steps = grid.shape[0]
    gs = _given(global_scale_of(fmt, True, jnp.min(wg, axis=1, keepdims=True), jnp.max(wg, axis=1, keepdims=True),
                                sdt), global_scale)

    def chunk(wc):  # (G, g, C)
        lo0, hi0 = jnp.min(wc, axis=1, keepdims=True), jnp.max(wc, axis=1, keepdims=True)

        def side_error(r, negative: bool):
            params = group_params(fmt, True, lo0 * r if negative else lo0, hi0 if negative else hi0 * r, sdt, gs)
            d = wc - decode(fmt, True, encode(fmt, True, wc, params), params)
            d = jnp.where((wc < 0) if negative else (wc >= 0), d, 0.0)
            return jnp.einsum("Gkt,GkC->GtC", xg, d, preferred_element_type=jnp.float32)

        e_neg = jax.lax.map(lambda r: side_error(r, True), grid)  # (S, G, T, C)
        e_pos = jax.lax.map(lambda r: side_error(r, False), grid)
        cross = jnp.einsum("iGtC,jGtC->ijGC", e_neg, e_pos, preferred_element_type=jnp.float32)
        err = (jnp.mean(e_neg * e_neg, axis=2)[:, None] + jnp.mean(e_pos * e_pos, axis=2)[None, :]
               + 2.0 * cross / t)  # (S, S, G, C)
        err = err.reshape(steps * steps, *err.shape[2:])  # pairs in scan order (r_neg major)
        best = jnp.argmin(err, axis=0)  # the first minimum, as the scan's strict "better" keeps
        return grid[best // steps], grid[best % steps], jnp.min(err, axis=0)

    chunks = wg.reshape(wg.shape[0], g, n_pad // cols, cols).transpose(2, 0, 1, 3)
    r_neg, r_pos, err = jax.lax.map(chunk, chunks)  # (n_chunks, G, C) each
    unchunk = lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], n_pad)[:, :n]  # noqa: E731
    return unchunk(r_neg)[:, None, :], unchunk(r_pos)[:, None, :], unchunk(err)


def clip_search(kernel: jax.Array, x: jax.Array, fmt: str | Format, *, group_size: int | None = 128,
                asym: bool = True, scale_dtype: DTypeLike = jnp.float16, steps: int = 10, step: float = 0.05,
                global_scale: jax.Array | float | None = None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """Best per-group shrink ratios ``(r_neg, r_pos)`` (each ``(G, 1, N)``, for `quantize(clip_ratios=...)`)
    and the minimised error ``(G, N)``. ``x`` holds calibration inputs ``(T, K)`` of this layer.

    The unclipped pair (1, 1) is in the grid and a pair only replaces the incumbent when strictly better, so
    the result never has a larger error than no clipping. ``global_scale``: E4M3 scales under this global
    scale instead of the kernel's own (`quantize`'s; the quantization that follows must use the same).
    """
    fmt = get_format(fmt)
    check_group_size(group_size)
    if np.ndim(kernel) != 2:
        raise InputError(f"clip_search takes one 2-D kernel (in_features, out_features), got shape "
                         f"{tuple(np.shape(kernel))}")
    k = kernel.shape[0]
    if np.shape(x)[-1] != k:
        raise InputError(f"calibration inputs have {np.shape(x)[-1]} features, the kernel expects {k} "
                         f"(x: (tokens, in_features))")
    g = k if group_size is None else min(group_size, k)
    grid = shrink_grid(steps, step)
    global_scale = check_global_scale(global_scale, scale_dtype, ())
    if asym and not fmt.is_int:
        per_column = steps * (-(-k // g)) * int(np.prod(np.shape(x)[:-1]))  # floats of e_neg per column
        cols = int(max(1, min(kernel.shape[1], 4_000_000 // max(1, per_column))))
        r_neg, r_pos, err = _search_separable(jnp.asarray(kernel), jnp.asarray(x).reshape(-1, k),
                                              jnp.asarray(grid), global_scale, fmt=fmt, g=g,
                                              sdt=jnp.dtype(scale_dtype), cols=cols)
        return (r_neg, r_pos), err
    if asym:
        pairs = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    else:
        pairs = np.stack([grid, grid], -1)
    r_neg, r_pos, err = _search(jnp.asarray(kernel), jnp.asarray(x).reshape(-1, k), jnp.asarray(pairs),
                                global_scale, fmt=fmt, asym=asym, g=g, sdt=jnp.dtype(scale_dtype))
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


DEFAULT_SKIP = ("attn.q_proj", "attn.k_proj", "attn.qkv_proj")  # LLaMA's q/k, BLOOM's fused qkv
_WARNED: set = set()
logger = logging.getLogger("afpq_jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSearch:
    """The clipping search as a step of a method (RTN, AWQ): per layer, on ``tokens`` input rows sampled from the
    search sequences, each with the layer's own scheme. Layers in ``skip`` keep their full range (q/k: their
    errors are damped by the softmax, as in AWQ and BitDistiller)."""

    tokens: int = 512
    steps: int = 10
    step: float = 0.05
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise InputError(f"ClipSearch.skip must be layer names within a block like 'attn.q_proj', got "
                             f"{self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))  # hashable and JSON-stable however it was given

    def validate(self) -> None:
        validation.integer(self.tokens, "clip search tokens")
        validation.integer(self.steps, "clip search steps")
        if not validation.number(self.step, "clip search step") > 0:
            raise InputError(f"clip search step must be positive, got {self.step}")
        if (self.steps - 1) * self.step >= 1:
            raise InputError(f"clip search ratios must stay positive: (steps - 1) * step = "
                             f"{(self.steps - 1) * self.step:g} >= 1")

    @staticmethod
    def coerce(clip: ClipSearch | bool | None, what: str) -> ClipSearch | None:
        """A method's ``clip`` option: True -> the default search, False / None -> none, or a `ClipSearch`."""
        if clip is True:
            return ClipSearch()
        if clip is False or clip is None:
            return None
        return validation.instance(clip, ClipSearch, what, "an afpq_jax.ClipSearch(...), True, False or None")

    def block_ratios(self, ctx: BlockContext) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{layer: (r_neg, r_pos)} for the block's quantized layers outside ``skip``."""
        unknown = [s for s in self.skip if s not in ctx.linears and s not in DEFAULT_SKIP]
        if unknown and (self, tuple(ctx.linears)) not in _WARNED:
            _WARNED.add((self, tuple(ctx.linears)))
            logger.warning("ClipSearch.skip entries %s name no layer of this model's blocks (they are %s); those "
                           "entries skip nothing", unknown, ", ".join(ctx.linears))
        x = ctx.search_sequences
        n_tokens = x.shape[0] * x.shape[1]
        rows = {name: ctx.rng.choice(n_tokens, size=min(self.tokens, n_tokens), replace=False)
                for name in ctx.schemes if name not in self.skip}
        inputs = ctx.sampled_inputs(rows)
        global_scales = ctx.shared_global_scales()  # as the quantization after this search takes them
        ratios = {}
        for name in rows:
            s = ctx.schemes[name]
            kernel = column_sharded(ctx.linears[name].kernel.get_value())  # columns are searched independently
            ratios[name], _ = clip_search(kernel, inputs.pop(name), s.format,
                                          group_size=s.group_size, asym=s.asym, scale_dtype=s.scale_dtype,
                                          steps=self.steps, step=self.step, global_scale=global_scales.get(name))
        return jax.block_until_ready(ratios)
