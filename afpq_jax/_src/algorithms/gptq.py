"""GPTQ (Frantar et al. 2023) with any afpq-jax format in the loop, AFPQ-style group scales.

Per linear layer with kernel ``W`` (K, N) and input Hessian ``H = 2/n sum x x^T`` (K, K):
damping (``damp`` x mean diagonal), Cholesky-based inverse, lazy block updates and error feedback, as in
AutoGPTQ. At each group boundary the group's parameters (``s_pos``/``s_neg`` for asymmetric FP/NF, scale/zero
for INT) are computed on the *error-updated* weights, which is how AFPQ plugs into GPTQ. With ``act_order``
columns are visited by decreasing Hessian diagonal, and groups are *static* (parameters computed up front on
the original weights in natural order), so the packed layout is the same as RTN's.

GPTQ's "columns" are input features, i.e. rows of a Flax kernel; we work on kernel rows directly (contiguous).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from afpq_jax._src import validation
from afpq_jax._src.calibration.method import BlockContext, Method, register_method
from afpq_jax._src.calibration.taps import XTX
from afpq_jax._src.sharding import column_sharded
from afpq_jax._src.errors import ArgumentTypeError, InputError, QuantizationError
from afpq_jax._src.formats import Format, get_format
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import (GroupParams, channel_scale_of, check_group_size, check_integer_scale_dtype,
                                     check_global_scale, check_scale_dtype, decode, encode, global_scale_of,
                                     group_params,
                                     integer_scale_limit, packed_tensor, snap_to_integer_scales)


def hessian_inverse_factor(h: jax.Array, damp: float) -> jax.Array:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H)*I)^-1`` (``U^T U = H^-1``, what GPTQ propagates
    errors with); NaN where the damped H is not positive definite.

    With ``P`` the order reversal and ``P H P = L L^T``: ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` and ``P L^-1 P`` is
    upper triangular with a positive diagonal, so it is that factor. One Cholesky and one triangular inverse,
    instead of AutoGPTQ's Cholesky, inverse from it and second Cholesky: about a third of the flops, and no
    second factorisation of an already rounded inverse.
    """
    k = h.shape[0]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    inverse = jax.scipy.linalg.solve_triangular(lower, jnp.eye(k, dtype=h.dtype), lower=True)
    return inverse[::-1, ::-1]


def _params_of(fmt, asym, rows, sdt, channel=None, global_scale=None) -> GroupParams:
    """Group parameters from a group's rows (g, N) of the working kernel, shaped (N,) each, rounded into the
    scale format as the group is fixed (E4M3 scales under the tensor's ``global_scale``, a scalar: MR-GPTQ's
    order); with ``channel`` ((1, N)) snapped to integer multiples of it (`snap_to_integer_scales`)."""
    if channel is None:
        return group_params(fmt, asym, jnp.min(rows, axis=0), jnp.max(rows, axis=0), sdt, global_scale)
    params = group_params(fmt, asym, jnp.min(rows, axis=0, keepdims=True), jnp.max(rows, axis=0, keepdims=True), sdt)
    params = snap_to_integer_scales(fmt, asym, rows, params, channel, fmt.integer_scale_max(asym))
    return GroupParams(*(None if p is None else p[0] for p in params))


def _take(params: GroupParams, idx) -> GroupParams:
    return GroupParams(*(None if p is None else p[idx] for p in params))


def _sub_block(rows: int, g: int | None) -> int:
    """Rows per inner sub-block of a GPTQ block of ``rows`` rows. With parameters per group (``g``; ``rows`` is a
    multiple of it) a sub-block must divide the group, so every group starts a sub-block: the largest divisor
    of ``g`` of at most 32, or the whole group when that divisor is under 8 (e.g. g = 37: tiny sub-blocks would
    cost more than they save). Static parameters (``g`` None): the same over ``rows``."""
    span = rows if g is None else g
    best = max(d for d in range(1, min(span, 32) + 1) if span % d == 0)
    return best if best >= 8 else span


def _quantize_block(w1, hinv1, static_params, row_groups, channel, global_scale, *, fmt: Format, asym: bool,
                    g: int, sdt, static: bool):
    """GPTQ over one block of input rows. w1: (B, N) kernel rows; hinv1: (B, B) upper; B holds whole groups
    unless ``static``. Rows are contiguous, so each step reads and writes whole rows.

    Two levels of lazy updates: a row's error moves only the rows of its sub-block (`_sub_block`, <= 32 rows),
    and each finished sub-block moves the rest of the block by one matmul. The same arithmetic as updating all
    B rows per row (AutoGPTQ), summed in another order, with a working set that stays in cache. A group's
    parameters are taken when its first sub-block starts, from rows that every earlier row has updated.

    Returns codes (B, N), this block's group params (stacked (B // g, N), None if static) and the scaled
    errors (B, N) for the lazy update of later blocks.
    """
    b, n = w1.shape
    sub = _sub_block(b, None if static else g)

    def row(c, carry, *, params_at, hsub):
        ws, codes, err = carry
        w = ws[c]
        params = params_at(c)
        code = encode(fmt, asym, w, params)
        e = (w - decode(fmt, asym, code, params)) / hsub[c, c]
        ws = ws - hsub[c][:, None] * e[None, :]  # hsub is upper triangular: only rows >= c move
        return ws, codes.at[c].set(code), err.at[c].set(e)

    codes, errs, block_params, params = [], [], [], None
    for s0 in range(0, b, sub):
        s1 = s0 + sub
        hsub = hinv1[s0:s1, s0:s1]
        carry = (w1[s0:s1], jnp.zeros((sub, n), jnp.uint8), jnp.zeros((sub, n), jnp.float32))
        if static:  # params per row given (act-order static groups, or per-channel)
            def params_at(c, groups=row_groups[s0:s1]):
                return _take(static_params, groups[c])
        else:
            if s0 % g == 0:
                params = _params_of(fmt, asym, w1[s0:s0 + g], sdt, channel, global_scale)
                block_params.append(params)

            def params_at(c, params=params):
                return params
        body = functools.partial(row, params_at=params_at, hsub=hsub)
        _, c_sub, e_sub = jax.lax.fori_loop(0, sub, body, carry)
        codes.append(c_sub)
        errs.append(e_sub)
        if s1 < b:  # this sub-block's errors reach the rest of the block
            w1 = w1.at[s1:].add(-(hinv1[s0:s1, s1:].T @ e_sub))
    stacked = None if static else GroupParams(*(None if block_params[0][i] is None else
                                                jnp.stack([p[i] for p in block_params]) for i in range(3)))
    return jnp.concatenate(codes), stacked, jnp.concatenate(errs)


def _damped(w, h, damp):
    """GPTQ's fixes of H: inputs that never fire (zero diagonal) get a unit diagonal and zero weights; then
    ``damp`` x mean(diag H) on the diagonal."""
    dead = jnp.diag(h) == 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[:, None], 0.0, w)
    return w, h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


@functools.partial(jax.jit, static_argnames=("bs", "act_order"))
def _factor(w, h, damp, *, bs: int, act_order: bool):
    """(column order, upper Cholesky factor of the damped, permuted, padded H^-1, whether it is finite).

    ``jnp.linalg.cholesky`` returns NaN instead of raising when H is not positive definite, so the caller checks
    the flag and retries with more damping. K is padded to a multiple of the block size ``bs`` with identity rows.
    """
    with jax.default_matmul_precision("highest"):
        k = h.shape[0]
        kp = -(-k // bs) * bs
        _, h = _damped(w, h, damp)
        perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
        perm = jnp.concatenate([perm, jnp.arange(k, kp)])
        h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(h.dtype))
        hinv = hessian_inverse_factor(h[perm][:, perm], 0.0)
        return perm, hinv, jnp.all(jnp.isfinite(hinv))


@functools.partial(jax.jit, static_argnames=("fmt", "asym", "g", "sdt", "static", "bs", "integer_scales"))
def _gptq(w, h, perm, hinv, global_scale=None, *, fmt: Format, asym: bool, g: int, sdt, static: bool, bs: int,
          integer_scales: bool = False):
    """The whole GPTQ of one kernel as one compiled program (one compilation per layer shape), given `_factor`'s
    column order and factor. Returns codes, group params and the channel scale ((1, 1, N); None unless
    ``integer_scales``).

    Integer group scales: the channel scale comes from the original weights' groups (as QServe's); each group's
    scales, computed from its error-updated rows when GPTQ reaches it, are snapped to integer multiples of it
    (clipped at `Format.integer_scale_max`, so a group that grew past the original maximum saturates).

    The padding rows are zero with identity Hessian rows: they quantize exactly, send no error, and (being zeros)
    never change a group's scales, so a short last group behaves exactly as in RTN.
    """
    with jax.default_matmul_precision("highest"):  # TPU / GPU would otherwise use bf16 / TF32 passes
        k, n = w.shape
        kp = perm.shape[0]
        n_groups = -(-k // g)
        w, _ = _damped(w, h, 0.0)
        w = jnp.pad(w, ((0, kp - k), (0, 0)))
        # groups in natural order, params from the (dead-zeroed) original weights
        grouped = jnp.pad(w, ((0, n_groups * g - kp if n_groups * g > kp else 0), (0, 0)))[: n_groups * g]
        grouped = grouped.reshape(n_groups, g, n)
        lo, hi = grouped.min(1, keepdims=True), grouped.max(1, keepdims=True)
        # E4M3 scales: one global scale from the original weights (as the tensor's amax in NVFP4), a scalar here
        gs = global_scale_of(fmt, asym, lo, hi, sdt)
        gs = None if gs is None else gs[0, 0, 0] if global_scale is None else global_scale.reshape(())
        original = group_params(fmt, asym, lo, hi, sdt, gs)
        channel = None
        if integer_scales:
            top = fmt.integer_scale_max(asym)
            channel = channel_scale_of(original, top, sdt)  # (1, 1, N)
            original = snap_to_integer_scales(fmt, asym, grouped, original, channel, top)
        if static:
            static_params = GroupParams(*(None if p is None else p[:, 0] for p in original))  # (G, N)
            row_groups = jnp.minimum(perm // g, n_groups - 1)
        else:
            static_params, row_groups = None, jnp.zeros((kp,), jnp.int32)
        w = w[perm]
        codes = jnp.zeros((kp, n), jnp.uint8)
        ref = group_params(fmt, asym, jnp.zeros((n,)), jnp.zeros((n,)), sdt, gs)
        params = GroupParams(*(None if p is None else jnp.zeros((kp // g if not static else 1, n), p.dtype)
                               for p in ref))

        def block_step(bi, carry):
            w, codes, params = carry
            i1 = bi * bs
            w1 = jax.lax.dynamic_slice_in_dim(w, i1, bs, 0)
            hrows = jax.lax.dynamic_slice_in_dim(hinv, i1, bs, 0)  # (bs, kp)
            hinv1 = jax.lax.dynamic_slice_in_dim(hrows, i1, bs, 1)
            groups = jax.lax.dynamic_slice_in_dim(row_groups, i1, bs, 0)
            c, bp, err = _quantize_block(w1, hinv1, static_params, groups, None if channel is None else channel[0],
                                         gs, fmt=fmt, asym=asym, g=g, sdt=sdt, static=static)
            later = (jnp.arange(kp) >= i1 + bs)[:, None]  # lazy update of the rows after this block
            w = jnp.where(later, w - hrows.T @ err, w)
            codes = jax.lax.dynamic_update_slice_in_dim(codes, c, i1, 0)
            if not static:
                params = GroupParams(*(None if p is None else jax.lax.dynamic_update_slice_in_dim(p, q, i1 // g, 0)
                                       for p, q in zip(params, bp)))
            return w, codes, params

        _, codes, params = jax.lax.fori_loop(0, kp // bs, block_step, (w, codes, params))
        codes = codes[jnp.argsort(perm)][:k]  # natural order
        params = static_params if static else GroupParams(*(None if p is None else p[:n_groups] for p in params))
        return codes, params, channel, gs


def damping_schedule(damp: float, step: float, max_damp: float) -> list[float]:
    """``damp``, then ``damp + step``, ``damp + 2 step``, ... up to ``max_damp`` (GPTQModel's auto-increment)."""
    out, k = [], 0
    while not out or out[-1] + 1e-12 < max_damp:
        out.append(min(damp + k * step, max_damp))
        k += 1
    return out


def check_options(damp: float, block_size: int) -> None:
    """GPTQ's damping (a fraction of mean(diag H), in [0, 1)) and block size (a positive integer)."""
    if not 0 <= validation.number(damp, "GPTQ damp") < 1:
        raise InputError(f"GPTQ damp must be in [0, 1), got {damp!r}")
    validation.integer(block_size, "GPTQ block_size")


def gptq_quantize(kernel: jax.Array, hessian: jax.Array, fmt: str | Format, *, group_size: int | None = 128,
                  asym: bool = True, scale_dtype: DTypeLike = jnp.float16, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, damp_step: float = 0.0025, max_damp: float = 1.0,
                  integer_scales: bool = False, name: str = "kernel",
                  global_scale: jax.Array | float | None = None) -> QuantizedTensor:
    """GPTQ-quantizes a kernel (K, N) given the Hessian (K, K) of its inputs.

    If the damped Hessian is not positive definite (its Cholesky factor is not finite), damping grows by
    ``damp_step`` up to ``max_damp``; if none works, or the result is not finite, raises `QuantizationError`
    naming ``name``. ``integer_scales``: see `_gptq` and `QuantizedTensor.channel_scale`. ``global_scale``: E4M3
    scales under this global scale instead of the kernel's own (`quantize`'s).
    """
    fmt = get_format(fmt)
    sdt = check_scale_dtype(scale_dtype)
    check_group_size(group_size)
    if integer_scales:
        integer_scale_limit(fmt, asym)
        check_integer_scale_dtype(sdt)
    if np.ndim(kernel) != 2 or 0 in np.shape(kernel):
        raise InputError(f"gptq_quantize takes one 2-D kernel (in_features, out_features), got shape "
                         f"{tuple(np.shape(kernel))} for {name}; quantize stacked kernels one at a time")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ArgumentTypeError(f"{name}: kernel dtype {jnp.dtype(kernel.dtype).name} is not floating point")
    check_options(damp, block_size)
    k, n = kernel.shape
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (k, k):
        raise InputError(f"Hessian shape {h.shape} does not match kernel in_features {k}")
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(kernel)))):  # jnp, not numpy: the kernel may span hosts
        raise InputError(f"{name} has NaN/inf weights; GPTQ needs finite weights — fix the checkpoint or the "
                         f"preceding step")
    g = k if group_size is None else min(group_size, k)
    static = act_order or group_size is None or g == k
    # Blocks hold whole groups so group parameters always see fully error-updated rows.
    bs = block_size if static else max(g, block_size // g * g)
    w = jnp.asarray(kernel, jnp.float32)
    for d in damping_schedule(damp, damp_step, max_damp):
        perm, hinv, ok = _factor(w, h, jnp.float32(d), bs=bs, act_order=act_order)
        if bool(ok):
            break
    else:
        raise QuantizationError(f"GPTQ: the Hessian of {name} is not positive definite even with damp {max_damp} "
                                f"(non-finite inputs, or too few calibration tokens); use more calibration samples "
                                f"or quantize this layer with RTN through a rule")
    global_scale = check_global_scale(global_scale, sdt, ())
    codes, params, channel, gs = _gptq(w, h, perm, hinv, global_scale, fmt=fmt, asym=asym, g=g, sdt=sdt,
                                       static=static, bs=bs, integer_scales=bool(integer_scales))
    if not all(bool(jnp.all(jnp.isfinite(p))) for p in params if p is not None):
        raise QuantizationError(f"GPTQ produced non-finite scales for {name} (damp {d}); check the calibration "
                                f"inputs of this layer for NaN/inf")
    params = GroupParams(*(None if p is None else p[:, None] for p in params))  # (G, 1, N), as packed_tensor takes
    return packed_tensor(codes, params, channel, fmt=fmt, group_size=group_size, asym=asym, scale_dtype=sdt,
                         dtype=kernel.dtype, global_scale=gs)


def accumulate_hessian(h: jax.Array | None, x: jax.Array, count: int) -> tuple[jax.Array, int]:
    """Running ``H = 2/n sum x x^T`` over batches of inputs ``x`` (..., K), in float32."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x.shape[0]
    new = _xtx(x)
    if h is None:
        return new * (2.0 / m), m
    total = count + m
    return h * (count / total) + new * (2.0 / total), total


@jax.jit
def _xtx(x):
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def output_mse(kernel, qkernel, x) -> float:
    """Mean squared error of ``x @ W`` vs ``x @ W_q`` (the layer-output error GPTQ/AWQ minimise)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(kernel)[0])
    d = x @ (np.asarray(kernel, np.float64) - np.asarray(qkernel, np.float64))
    return float(np.mean(d * d))


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(Method):
    """GPTQ on each block's quantized layers, each with its own scheme (`gptq_quantize`'s options)."""

    name: ClassVar[str] = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def validate(self) -> None:
        check_options(self.damp, self.block_size)
        if not isinstance(self.act_order, bool):
            raise InputError(f"GPTQ act_order must be True or False, got {self.act_order!r}")

    def statistics(self):
        return (XTX,)

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any] | None:
        with ctx.timer("gptq"):
            global_scales = ctx.shared_global_scales()  # from the original weights, before any is quantized
            for name, s in ctx.schemes.items():
                layer = ctx.linears[name]
                kernel = column_sharded(layer.kernel.get_value())  # columns are independent given H
                qt = gptq_quantize(kernel, ctx.stats[name]["xtx"] * (2.0 / ctx.tokens), s.format,
                                   group_size=s.group_size, asym=s.asym, scale_dtype=s.scale_dtype, damp=self.damp,
                                   block_size=self.block_size, act_order=self.act_order,
                                   integer_scales=s.integer_scales, name=f"layers.{ctx.index}.{name}",
                                   global_scale=global_scales.get(name))
                layer.set_quantized(jax.block_until_ready(qt))  # time lands in this phase
        return None
