"""Mosaic TPU kernel of W·A8: int8 activations and integer weight levels on the int8 MXU, int32 products, float
epilogue per group.

Same pipeline as the W4A16 Mosaic kernel (`quantized_matmul.mosaic_tpu`: grid (M tiles, N tiles, K steps), packed
code planes and group scales streamed into VMEM per K step, x permuted into slot segments), with x resident in
VMEM for the whole M tile (required for dynamic scales): at the first K step of each (M, N) tile the kernel takes
each row's max|x| over all of K (the dynamic per-token scale; static: the calibrated scalar), and every step
quantizes its x columns to int8 in vregs — no quantized copy of x goes through HBM.

Per chunk of ``chunk_k`` rows and slot: codes -> integer levels (`decode.integer_level`; INT: ``code - zero``,
at most 2**bits - 1 in magnitude, so zero points need no row-sum correction); a chunk holding several groups
takes one dot per group with the other groups' rows zeroed (lane-aligned x slices; no sub-128-lane slicing),
asymmetric FP/NF one more for the negative levels; each int32 product is scaled by its group's scale row(s) into
the float32 accumulator. Exact integer products; only the float epilogue rounds.

Integer group scales (`QuantizedTensor.channel_scale`): the levels are multiplied by their group's integer scale
(AFPQ: S_pos / S_neg by sign) into one int8 tile per slot — the groups of a chunk merge into that one tile, so
each slot takes a single int8 dot — and an int32 accumulator carries the whole K loop; the epilogue is one
per-column scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from afpq_jax._src.kernels.quantized_matmul import base, decode
from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu as w4a16_tpu
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, cdiv

INT8_MAX = 127.0


def default_config(prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
    """The W4A16 kernel's TPU tiling with x resident in VMEM (per-token scales need the whole row)."""
    return w4a16_tpu.default_config(prob, config).replace(x_resident=True)


def why_unsupported(prob: Problem, cfg: BlockConfig) -> str | None:
    if prob.fmt.int8_multiplier() is None:
        return f"{prob.format_name} has no integer levels"
    if prob.bits == 3:
        return "3-bit codes are not implemented for W·A8 on TPU"
    reason = w4a16_tpu.why_unsupported(prob, cfg)
    if reason is not None:
        return reason
    if not w4a16_tpu.plan(prob, cfg).x_resident:
        return "x must stay resident in VMEM (per-token scales need the whole row); use a smaller block_m"
    return None


def _kernel(*refs, prob: Problem, pl_, dynamic: bool):
    it = iter(refs)
    x_ref, c_ref, s_ref = next(it), next(it), next(it)
    sn_ref = next(it) if prob.has_neg else None
    z_ref = next(it) if prob.has_zero else None
    ch_ref = next(it) if prob.integer_scales else None
    xs_in = None if dynamic else next(it)
    o_ref, acc_ref, xs_ref = next(it), next(it), next(it)

    k = pl.program_id(2)
    p = pl_.slots
    mult = float(prob.fmt.int8_multiplier())
    gr = prob.kp if prob.per_channel else prob.group // p  # slot rows per group

    @pl.when(k == 0)
    def _prologue():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if dynamic:
            amax = jnp.zeros((pl_.bm, 1), jnp.float32)
            for t in range(pl_.tiles):
                amax = jnp.maximum(amax, jnp.max(jnp.abs(x_ref[t].astype(jnp.float32)), axis=1, keepdims=True))
            xs = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
        else:
            xs = jnp.broadcast_to(xs_in[0:1, 0:1], (pl_.bm, 1))
        xs_ref[...] = jnp.broadcast_to(xs, xs_ref.shape)

    xs = xs_ref[:, 0:1]
    inv = 1.0 / xs

    def load_scale(ref):
        v = ref[...].astype(jnp.int32 if prob.integer_scales else jnp.float32)
        if pl_.tiles > 1 and not prob.per_channel and prob.num_groups % pl_.scale_rows:
            row = jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) + k * pl_.scale_rows
            v = jnp.where(row < prob.num_groups, v, jnp.zeros_like(v))  # K tail: groups past the last scale to 0
        return v

    s_all = load_scale(s_ref)
    sn_all = load_scale(sn_ref) if sn_ref is not None else None
    z_all = z_ref[...].astype(jnp.int32) if z_ref is not None else None
    x_tile = x_ref.at[k]
    acc = jnp.zeros(acc_ref.shape, acc_ref.dtype)
    for r0 in range(0, pl_.slot_rows, pl_.cr):
        rows = min(pl_.cr, pl_.slot_rows - r0)
        codes = c_ref[pl.ds(r0, rows), :].astype(jnp.int32)
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        pieces = [(0, rows)] if gr >= rows else [(a, gr) for a in range(0, rows, gr)]
        for s, code in enumerate(decode.slot_codes(prob, [codes])):
            xv = x_tile[:, pl.ds(s * pl_.seg + r0, rows)].astype(jnp.float32) * inv
            xq = jnp.clip(jnp.round(xv), -INT8_MAX, INT8_MAX).astype(jnp.int8)
            levels = decode.integer_level(prob, code)
            if prob.integer_scales:  # one int8 tile: each piece's levels times its group's integer scale(s)
                w8 = None
                for a, n in pieces:
                    g = 0 if prob.per_channel else (r0 + a) // gr
                    lev = levels + 2 ** (prob.bits - 1) - z_all[g:g + 1, :] if prob.has_zero else levels
                    scale = (jnp.where(lev < 0, sn_all[g:g + 1, :], s_all[g:g + 1, :]) if prob.has_neg
                             else s_all[g:g + 1, :])
                    part = lev * scale
                    if len(pieces) > 1:
                        part = jnp.where((row >= a) & (row < a + n), part, 0)
                    w8 = part if w8 is None else w8 + part
                acc = acc + jax.lax.dot(xq, w8.astype(jnp.int8), preferred_element_type=jnp.int32)
                continue
            for a, n in pieces:
                g = 0 if prob.per_channel else (r0 + a) // gr  # group of these rows within the step
                lev = levels
                if prob.has_zero:
                    lev = lev + 2 ** (prob.bits - 1) - z_all[g:g + 1, :]  # code - zero
                if len(pieces) > 1:
                    lev = jnp.where((row >= a) & (row < a + n), lev, 0)
                if prob.has_neg:
                    neg = jnp.where(lev < 0, lev, 0)
                    p_all = jax.lax.dot(xq, lev.astype(jnp.int8), preferred_element_type=jnp.int32)
                    p_neg = jax.lax.dot(xq, neg.astype(jnp.int8), preferred_element_type=jnp.int32)
                    acc = acc + ((p_all - p_neg).astype(jnp.float32) * (s_all[g:g + 1, :] / mult)
                                 + p_neg.astype(jnp.float32) * (sn_all[g:g + 1, :] / mult))
                else:
                    p_all = jax.lax.dot(xq, lev.astype(jnp.int8), preferred_element_type=jnp.int32)
                    acc = acc + p_all.astype(jnp.float32) * (s_all[g:g + 1, :] / (1.0 if prob.kind == "int"
                                                                                   else mult))
    acc_ref[...] += acc

    @pl.when(k == pl_.tiles - 1)
    def _store():
        if prob.integer_scales:
            ch = ch_ref[0:1, :] * (1.0 / mult)
            o_ref[...] = (acc_ref[...].astype(jnp.float32) * ch * xs).astype(o_ref.dtype)
        else:
            o_ref[...] = (acc_ref[...] * xs).astype(o_ref.dtype)


def quantized_matmul_a8_tpu(x2d, qt, input_scale, prob: Problem, cfg: BlockConfig, *, interpret: bool = False):
    pl_ = w4a16_tpu.plan(prob, cfg)
    p, bm, bn, bk, T = pl_.slots, pl_.bm, pl_.bn, pl_.bk, pl_.tiles
    xp = base.permute_x(x2d, mp=pl_.mp, tiles=T, block_k=bk, slots=p, segment=pl_.seg)
    xp = xp.reshape(pl_.mp, T, p * pl_.seg).transpose(1, 0, 2)  # (T, mp, p*seg)
    x_spec = pl.BlockSpec((T, bm, p * pl_.seg), lambda i, j, k: (0, i, 0))
    (plane,) = prob.planes
    if T == 1:
        c_spec = pl.BlockSpec((prob.packed_rows, bn), lambda i, j, k: (0, j))
    else:
        c_spec = pl.BlockSpec((bk // plane.rows_per_byte, bn), lambda i, j, k: (k, j))
    if T == 1 or prob.per_channel:
        s_spec = pl.BlockSpec((pl_.scale_rows, bn), lambda i, j, k: (0, j))
    else:
        s_spec = pl.BlockSpec((pl_.scale_rows, bn), lambda i, j, k: (k, j))
    extra = [a for a in (qt.scale_neg, qt.zero) if a is not None]
    specs = [x_spec, c_spec, s_spec, *[s_spec] * len(extra)]
    # XLA may fuse x's permutation and the broadcasts below into the kernel's operand reads (never the weights).
    input_fusion = [True, False, False] + [False] * len(extra)
    if prob.integer_scales:  # (8, N) float32: a tile-aligned row block
        extra.append(jnp.broadcast_to(qt.channel_scale.astype(jnp.float32)[None], (8, prob.n)))
        specs.append(pl.BlockSpec((8, bn), lambda i, j, k: (0, j)))
        input_fusion.append(True)
    dynamic = input_scale is None
    if not dynamic:
        extra.append(jnp.broadcast_to(jnp.asarray(input_scale, jnp.float32), (8, 128)))
        specs.append(pl.BlockSpec((8, 128), lambda i, j, k: (0, 0)))
        input_fusion.append(True)
    grid = (pl_.mp // bm, cdiv(prob.n, bn), T)
    out = pl.pallas_call(
        functools.partial(_kernel, prob=prob, pl_=pl_, dynamic=dynamic),
        out_shape=jax.ShapeDtypeStruct((pl_.mp, prob.n), jnp.float32),
        grid=grid,
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32 if prob.integer_scales else jnp.float32),
                        pltpu.VMEM((bm, 128), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             allow_input_fusion=input_fusion),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"afpq_qmm_a8_{prob.format_name}",
    )(xp, qt.codes, qt.scale, *extra)
    return out[:prob.m]


@dataclasses.dataclass(frozen=True)
class MosaicTpu:
    name: str = "mosaic_tpu"
    backend: str = "tpu"

    def default_config(self, prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
        return default_config(prob, config)

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        return why_unsupported(prob, config)

    def __call__(self, x2d, qt, input_scale, prob, config, *, interpret=False):
        return quantized_matmul_a8_tpu(x2d, qt, input_scale, prob, config, interpret=interpret)
