"""Triton kernel (Pallas ``triton`` backend): one program per (N tile, M tile, K split), a loop over K tiles.

Per K tile of ``block_k`` rows the program loads, with masked pointer loads straight from the packed arrays,

* each bit plane's ``(block_k / rows_per_byte, block_n)`` uint8 tile (3-bit: the 2-bit plane's tile is split
  into its even and odd byte rows — a reshape to (rows/2, 2*block_n) and a split — so all eight slot matrices
  line up with the 1-bit plane's rows),
* the tile's scale rows: ``block_k / group`` rows (or the one row of the group containing the tile when the
  group is at least ``block_k``), each read once per (K tile, N tile) and broadcast to its rows in registers
  (broadcast + reshape, no gather),
* x's columns for each slot straight from x (slot s of tile t: columns ``t*block_k + s + p*r``, a strided
  pointer load; no XLA-side permutation pass and no padding copy of x),

unpacks and decodes in registers (`decode.dequant`; codebook levels by one load per weight from a
``2**bits``-entry float32 table that stays in L1, unless ``BlockConfig.lookup`` is False), casts to x's dtype and
issues one ``tl.dot`` per slot into a float32 accumulator. Out-of-range code rows/columns load as 0 (zero scales ->
+-0 weights) and x's columns past K load as 0; rows past M re-read row M - 1 and are never stored. So K, N and M
need not be multiples of the tiles (nothing is padded: a decode step moves no padding bytes). Tile sizes must be
powers of two (Triton), ``block_n`` and ``block_k`` per slot >= 16 (tensor-core dot minimum).

GEMV variant (``block_m`` < 16, opt-in for M <= 4; float32 or bfloat16 x): x's own rows (no padding to the dot's
16), float32 products of x and the weight (rounded to bfloat16 by integer ops for bfloat16 x, as the dot path's
cast does) summed over K (``tl.sum``; no dot operand layout), code bytes loaded evict-first. Which of the two is
faster at M <= 4 is for a device to measure: the benchmark times both ("triton-gemv"), the autotune tries it.

Decode (M <= 16) has only N / block_n output tiles; ``split_k`` programs then share each tile's K range and
write float32 partial sums that XLA adds (deterministic), or, with ``BlockConfig.split_k_atomic``, add them into
one float32 output with atomic adds. As far as K allows, the decode default launches at least 2 programs per SM
of an H100 (`decode_split`; the partial sums are L2-sized), each looping over >= 4 K tiles; see `split_k`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from afpq_jax._src.kernels.quantized_matmul import base, decode
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, cdiv, uses_lookup
from afpq_jax._src.kernels.quantized_matmul.xla import dot_precision


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


GEMV_MAX_M = 4  # the GEMV variant (block_m < 16, `_kernel`) is meant for up to this many rows of x
TARGET_PROGRAMS = 264  # 2 programs (CTAs) per SM on a 132-SM H100: the minimum for decode to fill the card
MIN_TILES_PER_SPLIT = 4  # K tiles each decode program loops over, so the pipeline has loads to overlap
SMEM_PER_SM = 228 * 1024  # Hopper; two resident CTAs must fit in it together
L2_PARTIALS_BYTES = 12 * 2**20  # split-K partial sums up to here stay in the 50 MB L2 (written, read back once)


def decode_split(prob: Problem, bm: int, bn: int) -> int:
    """Decode (M <= 16): the power-of-two split-K that gives at least `TARGET_PROGRAMS` programs (the output
    tiles alone are N / block_n: 64 at N = 4096), bounded by the L2-resident partial sums."""
    programs = cdiv(prob.n, bn) * cdiv(prob.m, bm)
    split = 1
    while programs * split < TARGET_PROGRAMS and 2 * split * prob.m * prob.n * 4 <= L2_PARTIALS_BYTES:
        split *= 2
    return split


def split_k(prob: Problem, bm: int, bn: int, bk: int) -> int:
    """Power of two. Decode (M <= 16): `decode_split`, as far as the K tiles allow `MIN_TILES_PER_SPLIT` each
    (the partial sums stay in L2, so they cost no HBM traffic). Larger M: enough programs to fill the GPU while
    the partial sums' extra traffic (written and read back as float32, no longer L2-sized) stays under 3% of the
    packed weight's bytes."""
    programs = cdiv(prob.n, bn) * cdiv(prob.m, bm)
    tiles = cdiv(prob.kp, bk)
    if prob.m <= 16:
        split = 1
        while split < decode_split(prob, bm, bn) and 2 * split * MIN_TILES_PER_SPLIT <= tiles:
            split *= 2
        return split
    weight_bytes = prob.packed_rows * prob.n
    split = 1
    while (split * 2 <= tiles and programs * split < TARGET_PROGRAMS
           and 2 * split * 2 * prob.m * prob.n * 4 <= 0.03 * weight_bytes):
        split *= 2
    return split


def smem_bytes(prob: Problem, bm: int, bn: int, bk: int, stages: int) -> int:
    """Upper estimate of the kernel's shared memory: ``stages`` buffers of the pipelined x, code and scale tiles,
    plus the decoded weight tile that ``tl.dot`` takes from shared memory."""
    it = jnp.dtype(prob.x_dtype).itemsize
    scale_rows = 1 if prob.per_channel else cdiv(bk, prob.group)
    per_step = bm * bk * it + bk * prob.bits // 8 * bn + prob.n_scale_arrays * scale_rows * bn * 4
    return stages * per_step + bk * bn * it


def default_config(prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
    """Triton's tiling for ``prob``: decode-sized M tiles, wide N tiles, deep K, within the shared-memory
    budget; split-K by `split_k`."""
    p = prob.slots
    bm = 16 if prob.m <= 16 else (32 if prob.m <= 32 else (64 if prob.m <= 64 else 128))  # tensor-core min 16
    bn = min(128 if prob.m > 16 else 64, base.pow2_ge(prob.n))
    bn = max(bn, 16)
    bk = 16 * p  # minimum: every slot matrix is >= 16 rows (tl.dot)
    target = 256 if prob.m > 64 else 512
    if prob.m <= 16:  # decode: K tiles small enough that each of the splits filling the card loops over a few
        want = decode_split(prob, bm, bn) * MIN_TILES_PER_SPLIT
        target = min(target, max(128, 1 << max(0, (prob.kp // want).bit_length() - 1)))
    bk = max(bk, min(target, base.pow2_ge(prob.kp)))
    if not prob.per_channel and prob.group < bk and bk % prob.group:
        bk = prob.group
    warps = 4 if prob.m <= 64 else 8
    stages = 3
    # Prefill tiles (128 x 256 at 3 stages) ask for 256 KiB of shared memory: Hopper has 227 KiB per CTA
    # (measured: RESOURCE_EXHAUSTED on an H200). Halve K first (groups stay whole: both are powers of two).
    while smem_bytes(prob, bm, bn, bk, stages) > base.GPU_SMEM_BUDGET:
        if bk // 2 >= 16 * p and bk % 2 == 0:
            bk //= 2
        elif stages > 2:
            stages -= 1
        else:
            break
    # Decode runs 2 programs per SM: fewer stages where two would not fit in one SM's shared memory together.
    while prob.m <= 16 and stages > 2 and 2 * smem_bytes(prob, bm, bn, bk, stages) > SMEM_PER_SM:
        stages -= 1
    return BlockConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                       split_k=split_k(prob, bm, bn, bk), lookup=True)


def why_unsupported(prob: Problem, cfg: BlockConfig) -> str | None:
    if prob.batched:
        return "stacked (batched) weights; vmap the op over the stack instead"
    p = prob.slots
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if not _pow2(bm):
        return f"block_m={bm} must be a power of two (Triton tensors; below 16 the kernel runs as a GEMV)"
    if bm < 16 and jnp.dtype(prob.x_dtype) == jnp.float16:
        return f"block_m={bm}: the GEMV variant (block_m < 16) takes float32 or bfloat16 x"
    for name, v in (("block_n", bn), ("block_k / slots", bk // p)):
        if not _pow2(v) or v < 16:
            return f"{name}={v} must be a power of two >= 16 (Triton tensors / tl.dot)"
    if bk % p:
        return f"block_k={bk} must be a multiple of {p} rows per byte"
    if not prob.per_channel:
        g = prob.group
        if not _pow2(g) or g % p:
            return f"group size {g} must be a power of two (Triton tensor shapes)"
        if g < bk and bk % g:
            return f"block_k={bk} must be a multiple of the group size {g}"
        if g >= bk and g % bk:
            return f"group size {g} must be a multiple of block_k={bk}"
    if cfg.split_k is not None and cfg.split_k < 1:
        return f"split_k={cfg.split_k} must be >= 1"
    return None


def load_code_planes(prob: Problem, c_ref, load_rows, t, bk: int, bn: int) -> list[jax.Array]:
    """K tile ``t``'s code planes as int32 tiles for `decode.slot_codes`; ``load_rows(ref, row0, rows, end)`` is
    the kernel's masked row loader. 3-bit: the 2-bit plane's even / odd byte rows come from a contiguous
    (2*seg, bn) load viewed as (seg, 2*bn) rows [byte 2r | byte 2r+1] and split in halves (reshape + tt.split; no
    strided or gathered loads)."""
    seg = bk // prob.slots
    if prob.bits == 3:
        p2, p1 = prob.planes
        both = load_rows(c_ref, t * (bk // 4), 2 * seg, p2.row_offset + p2.rows).reshape(seg, 2 * bn)
        even, odd = jnp.split(both, 2, axis=1)
        planes = [even, odd, load_rows(c_ref, p1.row_offset + t * seg, seg, p1.row_offset + p1.rows)]
    else:
        (p0,) = prob.planes
        planes = [load_rows(c_ref, t * seg, seg, p0.rows)]
    return [v.astype(jnp.int32) for v in planes]


def table_reader(t_ref):
    """`decode`'s ``lookup`` for a kernel's level-table ref (one load per element, L1-resident), or None."""
    return None if t_ref is None else (lambda code: pltr.load(t_ref.at[code]))


def x_slot_indices(prob: Problem, i, bm: int, bk: int) -> tuple[jax.Array, list[jax.Array]]:
    """Loop-invariant indices of x's slot columns in M tile ``i``: (rows, per-slot column offsets). Slot ``s`` of
    K tile ``t`` is columns ``t*bk + s + p*r`` (r < bk/p): a strided pointer load of the unpermuted x, written
    as explicit indices (the Pallas interpreter has no strided slices). Rows past M re-read row M - 1: their
    outputs are never stored, so they need no mask."""
    seg = bk // prob.slots
    rows = jnp.minimum(i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, seg), 0), prob.m - 1)
    r = jax.lax.broadcasted_iota(jnp.int32, (bm, seg), 1)
    return rows, [s + prob.slots * r for s in range(prob.slots)]


def load_x_slot(x_ref, prob: Problem, rows, col0, t, bk: int):
    """Slot columns ``col0 + t*bk`` of x; columns past K read as 0 (masked only when K is not a multiple of
    ``bk``: otherwise no tile reaches past K)."""
    cols = col0 + t * bk
    if prob.k % bk:
        return pltr.load(x_ref.at[rows, cols], mask=cols < prob.k, other=0)
    return pltr.load(x_ref.at[rows, cols])


def _kernel(*refs, prob: Problem, cfg: BlockConfig, tiles: int, per_split: int):
    it = iter(refs)
    x_ref, c_ref, s_ref = next(it), next(it), next(it)
    sn_ref = next(it) if prob.has_neg else None
    z_ref = next(it) if prob.has_zero else None
    t_ref = next(it) if uses_lookup(prob, cfg) else None
    o_ref = next(it)
    lookup = table_reader(t_ref)

    bm, bn, bk, p = cfg.block_m, cfg.block_n, cfg.block_k, prob.slots
    seg = bk // p
    j, i = pl.program_id(0), pl.program_id(1)
    n0 = j * bn
    col_ok = (n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < prob.n
    row_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < prob.m  # nothing is padded along M
    x_rows, x_cols = x_slot_indices(prob, i, bm, bk)
    xdt = jnp.dtype(prob.x_dtype)
    precision = dot_precision(xdt)
    gemv = bm < 16  # decode of a few rows: multiply and sum in float32, no tensor-core dot (`default_config`)

    def load_rows(ref, row0, rows, end, eviction_policy=None):
        """Rows [row0, row0 + rows) x this N tile; rows >= end and columns >= N read as 0."""
        r = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        return pltr.load(ref.at[pl.ds(row0, rows), pl.ds(n0, bn)], mask=(r < end) & col_ok, other=0,
                         eviction_policy=eviction_policy)

    def load_codes(ref, row0, rows, end):
        # a GEMV streams each weight byte once: evict it first, keeping x, scales and the table in cache
        return load_rows(ref, row0, rows, end, "evict_first" if gemv else None)

    def scale_rows(ref, t):
        """The K tile's scale rows, float32: one row (the group holding the tile) or one per group in it."""
        if ref is None:
            return None
        if prob.per_channel or prob.group >= bk:
            g = 0 if prob.per_channel else (t * bk) // prob.group
            return load_rows(ref, g, 1, prob.num_groups).astype(jnp.float32)
        tpg = bk // prob.group
        return load_rows(ref, t * tpg, tpg, prob.num_groups).astype(jnp.float32)

    def to_slot_rows(v):
        """Scale rows -> one per slot row (broadcast + reshape, no gather); constants stay as they are."""
        if v is None or not hasattr(v, "ndim") or v.ndim == 0:
            return v
        if v.shape[0] == 1:
            return jnp.broadcast_to(v, (seg, bn))
        gr = prob.group // p
        return jnp.broadcast_to(v[:, None, :], (v.shape[0], gr, bn)).reshape(seg, bn)

    def body(t, acc):
        planes = load_code_planes(prob, c_ref, load_codes, t, bk, bn)
        # scale work (casts, s_neg's sign, the zero point's bias) once per scale row, before the broadcast
        sc = decode.Scales(*map(to_slot_rows, decode.prepare_scales(
            prob, scale_rows(s_ref, t), scale_rows(sn_ref, t), scale_rows(z_ref, t))))
        for s, w in enumerate(decode.dequant_slots(prob, planes, sc, lookup)):
            xs = load_x_slot(x_ref, prob, x_rows, x_cols[s], t, bk)
            if gemv:  # the weight as x's dtype holds it (the op's contract), then float32 products summed over K
                w32 = w if xdt == jnp.float32 else decode.round_to_bfloat16(w)
                acc = acc + jnp.sum(xs.astype(jnp.float32)[:, :, None] * w32[None, :, :], axis=1)
            else:
                acc = acc + jax.lax.dot_general(xs, w.astype(xdt), (((1,), (0,)), ((), ())), precision=precision,
                                                preferred_element_type=jnp.float32)
        return acc

    rows, cols = pl.ds(i * bm, bm), pl.ds(n0, bn)
    if per_split == tiles:  # the whole K range (a static trip count)
        acc = jax.lax.fori_loop(0, tiles, body, jnp.zeros((bm, bn), jnp.float32))
        pltr.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=row_ok & col_ok)
        return
    # split-K: this program's K range; float32 partial sums, reduced in XLA or added atomically
    ks = pl.program_id(2)
    first = ks * per_split
    acc = jax.lax.fori_loop(first, jnp.minimum(first + per_split, tiles), body, jnp.zeros((bm, bn), jnp.float32))
    if cfg.split_k_atomic:  # the output is padded to whole tiles: no mask (rows past M and columns past N are
        # dropped by the caller)
        pltr.atomic_add(o_ref, (rows, cols), acc)
    else:
        pltr.store(o_ref.at[ks, rows, cols], acc, mask=row_ok & col_ok)


def effective_split(prob: Problem, cfg: BlockConfig) -> tuple[int, int]:
    """(number of K splits, K tiles per split) actually launched for ``cfg.split_k``."""
    tiles = cdiv(prob.kp, cfg.block_k)
    per_split = cdiv(tiles, max(1, min(cfg.split_k or 1, tiles)))
    return cdiv(tiles, per_split), per_split


def quantized_matmul_triton(x2d, qt, prob: Problem, cfg: BlockConfig, *, interpret: bool = False):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles = cdiv(prob.kp, bk)
    extra = [a for a in (qt.scale_neg, qt.zero) if a is not None]
    if uses_lookup(prob, cfg):
        extra.append(jnp.asarray(decode.lookup_table(prob)))
    split, per_split = effective_split(prob, cfg)
    atomic = split > 1 and bool(cfg.split_k_atomic)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((prob.m, prob.n), x2d.dtype)
    elif atomic:  # one float32 output of whole tiles, zeroed here, that every split adds into (aliased: the
        # kernel's output)
        padded = (base.round_up(prob.m, bm), base.round_up(prob.n, bn))
        out_shape = jax.ShapeDtypeStruct(padded, jnp.float32)
        extra.append(jnp.zeros(padded, jnp.float32))
    else:
        out_shape = jax.ShapeDtypeStruct((split, prob.m, prob.n), jnp.float32)
    args = (x2d, qt.codes, qt.scale, *extra)
    kernel = functools.partial(_kernel, prob=prob, cfg=cfg.replace(split_k_atomic=atomic), tiles=tiles,
                               per_split=per_split)
    out = pl.pallas_call(
        (lambda *refs: kernel(*refs[:-2], refs[-1])) if atomic else kernel,  # the aliased input is the output
        out_shape=out_shape,
        grid=(cdiv(prob.n, bn), cdiv(prob.m, bm), split),
        input_output_aliases={len(args) - 1: 0} if atomic else {},
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"afpq_qmm_{prob.format_name}",
    )(*args)
    if split == 1:
        return out
    return (out[:prob.m, :prob.n] if atomic else jnp.sum(out, axis=0)).astype(x2d.dtype)


@dataclasses.dataclass(frozen=True)
class Triton:
    name: str = "triton"
    backend: str = "gpu"

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        return why_unsupported(prob, config)

    def preferred(self, prob: Problem) -> str | None:
        return base.gpu_why_not_preferred(prob)

    def default_config(self, prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
        return default_config(prob, config)

    def launch(self, prob: Problem, config: BlockConfig) -> dict[str, int]:
        """What a call launches: programs (CTAs) and the upper estimate of each one's shared memory."""
        split, _ = effective_split(prob, config)
        return dict(programs=cdiv(prob.n, config.block_n) * cdiv(prob.m, config.block_m) * split,
                    smem_bytes=smem_bytes(prob, config.block_m, config.block_n, config.block_k, config.num_stages))

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        return quantized_matmul_triton(x2d, qt, prob, config, interpret=interpret)
