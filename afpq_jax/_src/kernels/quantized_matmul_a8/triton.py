"""Triton kernel of W·A8 (Pallas ``triton`` backend): int8 activations quantized in the kernel, integer weight
levels decoded in registers, int8 x int8 ``tl.dot`` with int32 accumulation per quantization group, and the
float epilogue (group scales, AFPQ's split by code sign, INT zero points, activation scale) once per group.

One program per (N tile, M tile, K split); K tiles of ``block_k`` rows never straddle a group (``block_k``
divides the group size, or the weight is per-channel). Decode splits K like the W4A16 kernel (>= 2 programs per
SM); each split writes float32 partial outputs that XLA sums. x arrives as it is, in float, and each slot's
columns are read with the W4A16 kernel's strided loads: the dynamic per-token scale is the prologue of the
kernel (a pass over the M tile's x rows computing max|x|, then every tile is quantized in registers), so no
quantized copy of x is ever written to memory. Per K tile and slot: codes -> integer levels
(`decode.integer_level`; codebook formats by one load from an int32 level table unless ``BlockConfig.lookup``
is False), split into positive and negative levels for asymmetric FP/NF (two int8 dots into two
int32 accumulators), INT-asym keeps a row sum of the int8 activations for the zero-point correction. At a
group's last tile the int32 sums are converted and scaled into the float32 accumulator.

Integer group scales (`QuantizedTensor.channel_scale`): each slot's levels are multiplied by their group's
integer scale (AFPQ: S_pos or S_neg by sign; INT: ``S · (code − zero)``) into one int8 tile, all K tiles
accumulate into one int32 accumulator, and the epilogue is one per-column scale: no float work in the K loop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from afpq_jax._src.kernels.quantized_matmul import base, decode
from afpq_jax._src.kernels.quantized_matmul import triton as w4a16_triton
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, cdiv

INT8_MAX = 127.0


def default_config(prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
    """The W4A16 kernel's Triton tiling with K steps within one group (per-group integer sums), and its split-K
    for that step (decode: >= 2 programs per SM, `w4a16_triton.split_k`)."""
    cfg = w4a16_triton.default_config(prob)
    cfg = cfg.replace(block_m=max(cfg.block_m, 16))  # int8 tl.dot: no GEMV variant here
    if not prob.per_channel and cfg.block_k > prob.group:
        cfg = cfg.replace(block_k=prob.group)
    tile = base.merge(config, cfg)  # the split for the tiles that will run, a caller's included
    return cfg.replace(split_k=w4a16_triton.split_k(prob, tile.block_m, tile.block_n, tile.block_k))


def why_unsupported(prob: Problem, cfg: BlockConfig) -> str | None:
    if prob.fmt.int8_multiplier() is None:
        return f"{prob.format_name} has no integer levels"
    reason = w4a16_triton.why_unsupported(prob, cfg)
    if reason is not None:
        return reason
    if cfg.block_m < 16:
        return f"block_m={cfg.block_m} must be >= 16 (int8 tl.dot)"
    if not prob.per_channel and cfg.block_k > prob.group:
        return f"block_k={cfg.block_k} must not exceed the group size {prob.group} (per-group integer sums)"
    return None


def _quantize(x: jax.Array, inv: jax.Array) -> jax.Array:
    """``clip(round_half_even(x * inv), -127, 127)`` as int8 with floor and selects (Pallas Triton has no
    ``round`` primitive); equal to `xla.quantize_activations`."""
    v = jnp.clip(x * inv, -INT8_MAX, INT8_MAX)
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
    r = jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return r.astype(jnp.int8)


def _kernel(*refs, prob: Problem, cfg: BlockConfig, tiles: int, per_split: int, dynamic: bool):
    it = iter(refs)
    x_ref, c_ref, s_ref = next(it), next(it), next(it)
    sn_ref = next(it) if prob.has_neg else None
    z_ref = next(it) if prob.has_zero else None
    ch_ref = next(it) if prob.integer_scales else None
    xs_ref = None if dynamic else next(it)
    t_ref = next(it) if base.uses_lookup(prob, cfg) else None
    o_ref = next(it)
    lookup = w4a16_triton.table_reader(t_ref)

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    mult = float(prob.fmt.int8_multiplier())
    j, i = pl.program_id(0), pl.program_id(1)
    n0 = j * bn
    col_ok = (n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < prob.n
    row_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < prob.m

    def load_rows(ref, row0, rows, end):
        r = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        return pltr.load(ref.at[pl.ds(row0, rows), pl.ds(n0, bn)], mask=(r < end) & col_ok, other=0)

    x_rows, x_cols = w4a16_triton.x_slot_indices(prob, i, bm, bk)

    def load_x(t, s):
        return w4a16_triton.load_x_slot(x_ref, prob, x_rows, x_cols[s], t, bk).astype(jnp.float32)

    def row_amax(t, m):
        cols = t * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        v = pltr.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)], mask=row_ok & (cols < prob.k), other=0)
        return jnp.maximum(m, jnp.max(jnp.abs(v.astype(jnp.float32)), axis=1, keepdims=True))

    # This program's K tiles (split-K: a contiguous range; its float32 partial output is summed in XLA).
    first = pl.program_id(2) * per_split
    end = jnp.minimum(first + per_split, tiles)
    out_block = (o_ref.at[pl.program_id(2), pl.ds(i * bm, bm), pl.ds(n0, bn)] if per_split < tiles
                 else o_ref.at[pl.ds(i * bm, bm), pl.ds(n0, bn)])

    if dynamic:  # prologue: per-token max|x| over the whole row (every split: the scale is the row's)
        amax = jax.lax.fori_loop(0, tiles, row_amax, jnp.zeros((bm, 1), jnp.float32))
        xs = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    else:
        xs = jnp.broadcast_to(pltr.load(xs_ref.at[pl.ds(0, 1), pl.ds(0, 1)]).astype(jnp.float32), (bm, 1))
    inv = 1.0 / xs

    def group_row(ref, t, dtype=jnp.float32):
        g = 0 if prob.per_channel else (t * bk) // prob.group
        return load_rows(ref, g, 1, prob.num_groups).astype(dtype)  # (1, bn)

    if prob.integer_scales:
        def int_body(t, acc):
            planes = w4a16_triton.load_code_planes(prob, c_ref, load_rows, t, bk, bn)
            s_pos = group_row(s_ref, t, jnp.int32)
            s_neg = group_row(sn_ref, t, jnp.int32) if prob.has_neg else None
            zero = group_row(z_ref, t, jnp.int32) - 2 ** (prob.bits - 1) if prob.has_zero else None
            for s, code in enumerate(decode.slot_codes(prob, planes)):
                xq = _quantize(load_x(t, s), inv)
                lev = decode.integer_level(prob, code, lookup)
                if zero is not None:
                    lev = lev - zero  # code - zero: the shifted level minus the shifted zero point
                w8 = lev * (jnp.where(lev < 0, s_neg, s_pos) if s_neg is not None else s_pos)
                acc = acc + jax.lax.dot(xq, w8.astype(jnp.int8), preferred_element_type=jnp.int32)
            return acc

        acc = jax.lax.fori_loop(first, end, int_body, jnp.zeros((bm, bn), jnp.int32))
        ch = load_rows(ch_ref, 0, 1, 1).astype(jnp.float32) * (1.0 / mult)
        pltr.store(out_block, (acc.astype(jnp.float32) * ch * xs).astype(o_ref.dtype), mask=row_ok & col_ok)
        return

    def body(t, carry):
        acc, p_pos, p_neg, rsum = carry
        planes = w4a16_triton.load_code_planes(prob, c_ref, load_rows, t, bk, bn)
        for s, code in enumerate(decode.slot_codes(prob, planes)):
            xq = _quantize(load_x(t, s), inv)
            lev = decode.integer_level(prob, code, lookup)
            if prob.has_neg:
                pos = jnp.where(lev > 0, lev, 0).astype(jnp.int8)
                neg = jnp.where(lev < 0, lev, 0).astype(jnp.int8)
                p_pos = p_pos + jax.lax.dot(xq, pos, preferred_element_type=jnp.int32)
                p_neg = p_neg + jax.lax.dot(xq, neg, preferred_element_type=jnp.int32)
            else:
                p_pos = p_pos + jax.lax.dot(xq, lev.astype(jnp.int8), preferred_element_type=jnp.int32)
            if prob.has_zero:
                rsum = rsum + jnp.sum(xq.astype(jnp.int32), axis=1, keepdims=True)
        if prob.per_channel:
            last_of_group = t == end - 1
        else:  # block_k divides the group: every (group // block_k)-th tile closes a group, and so does the
            # split's last tile (a group cut by a split boundary is scaled in both parts: the sums are linear)
            last_of_group = (jax.lax.rem(t + 1, prob.group // bk) == 0) | (t == end - 1)
        if prob.kind == "int":
            term = p_pos.astype(jnp.float32)
            if prob.has_zero:  # sum_k xq (c - z) = P - z * R, zero point shifted like the codes
                term = term - (group_row(z_ref, t) - 2.0 ** (prob.bits - 1)) * rsum.astype(jnp.float32)
            term = term * group_row(s_ref, t)
        else:
            term = p_pos.astype(jnp.float32) * (group_row(s_ref, t) / mult)
            if prob.has_neg:
                term = term + p_neg.astype(jnp.float32) * (group_row(sn_ref, t) / mult)
        acc = jnp.where(last_of_group, acc + term, acc)
        return acc, *(jnp.where(last_of_group, jnp.zeros_like(v), v) for v in (p_pos, p_neg, rsum))

    zi = jnp.zeros((bm, bn), jnp.int32)
    acc, *_ = jax.lax.fori_loop(first, end, body, (jnp.zeros((bm, bn), jnp.float32), zi, zi,
                                                  jnp.zeros((bm, 1), jnp.int32)))
    pltr.store(out_block, (acc * xs).astype(o_ref.dtype), mask=row_ok & col_ok)


def quantized_matmul_a8_triton(x2d, qt, input_scale, prob: Problem, cfg: BlockConfig, *, interpret: bool = False):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles = cdiv(prob.kp, bk)
    extra = [a for a in (qt.scale_neg, qt.zero) if a is not None]
    if prob.integer_scales:
        extra.append(qt.channel_scale.reshape(1, prob.n))
    dynamic = input_scale is None
    if not dynamic:
        extra.append(jnp.asarray(input_scale, jnp.float32).reshape(1, 1))
    if base.uses_lookup(prob, cfg):
        extra.append(jnp.asarray(decode.integer_lookup_table(prob)))
    split, per_split = w4a16_triton.effective_split(prob, cfg)
    out = pl.pallas_call(
        functools.partial(_kernel, prob=prob, cfg=cfg, tiles=tiles, per_split=per_split, dynamic=dynamic),
        out_shape=jax.ShapeDtypeStruct((prob.m, prob.n) if split == 1 else (split, prob.m, prob.n), jnp.float32),
        grid=(cdiv(prob.n, bn), cdiv(prob.m, bm), split),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"afpq_qmm_a8_{prob.format_name}",
    )(x2d, qt.codes, qt.scale, *extra)
    return out if split == 1 else jnp.sum(out, axis=0)


@dataclasses.dataclass(frozen=True)
class Triton:
    name: str = "triton"
    backend: str = "gpu"

    def default_config(self, prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
        return default_config(prob, config)

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        return why_unsupported(prob, config)

    def __call__(self, x2d, qt, input_scale, prob, config, *, interpret=False):
        return quantized_matmul_a8_triton(x2d, qt, input_scale, prob, config, interpret=interpret)
