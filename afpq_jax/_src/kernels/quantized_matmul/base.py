"""Shared pieces of the quantized matmul: the static problem description, the block config, the x permutation.

Everything here is backend-neutral and static (Python ints), except `permute_x`, which is the one XLA-side
transform the kernels use: a per-tile permutation of x's K columns that makes the packed code layout directly
consumable (see "Slots" below). The packed weight itself is never copied or re-laid-out.

Slots. A packed byte holds ``q = 8 // w`` consecutive K rows of one plane (LSB first). Splitting a K tile's
codes by "slot" ``s = row % p`` (``p`` = rows per byte of the narrowest plane: 2 for 4-bit, 4 for 2-bit, 8 for
3-bit) turns the tile into ``p`` dense matrices ``W_s`` whose row ``r`` is tile row ``r * p + s``; each is
obtained from the code bytes with shifts and masks only, no data movement across rows. Then
``x_tile @ W_tile = sum_s x_tile[:, s::p] @ W_s``, so x's columns are permuted per tile to
``[s = 0 columns | s = 1 columns | ...]`` (each segment padded to ``segment`` columns). For decode-sized x this
is a few KiB of XLA work; for prefill it is one pass over x next to an O(M*K*N) matmul.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.errors import InputError
from afpq_jax._src import formats as formats_lib
from afpq_jax._src import packing
from afpq_jax._src.qtensor import QuantizedTensor

BACKENDS = ("tpu", "gpu", "cpu")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def with_reference_derivatives(kernel: Callable, reference: Callable) -> Callable:
    """``kernel`` with the derivatives of ``reference``: a function of the same arrays computing the same value up
    to summation order (the op's "xla" path). Pallas and FFI kernels have no JVP or transpose rule of their own;
    through this, `jax.grad`, `jax.jvp` and their compositions reach x and the float scales whichever
    implementation dispatch picked (integer codes get float0 tangents). The forward pass still runs ``kernel``;
    derivative passes run ``reference``'s linearization (dequantize, dot) beside it."""
    @jax.custom_jvp
    def fn(*args):
        return kernel(*args)

    @fn.defjvp
    def _jvp(primals, tangents):
        _, tangent_out = jax.jvp(reference, primals, tangents)
        return kernel(*primals), tangent_out

    return fn


# ---------------------------------------------------------------------------------------------------------
# Decode kinds: how a kernel maps a code to its level without a gather.

def _is_e2m1(levels: tuple[float, ...]) -> bool:
    return tuple(levels) == tuple(formats_lib.exmy_levels(2, 1, 1))


def _is_sign_symmetric(levels: tuple[float, ...], bits: int) -> bool:
    n = len(levels)
    if n != 2**bits:
        return False
    half = n // 2
    return all(levels[i] == -levels[n - 1 - i] for i in range(n)) and all(
        np.signbit(levels[i]) for i in range(half)) and not any(np.signbit(levels[i]) for i in range(half, n))


def decode_kind(fmt: formats_lib.Format) -> str:
    """"int": arithmetic ``(code - zero) * s``; "e2m1": arithmetic FP4 decode (bit construction of the float);
    "signsym": sign bit = code < n/2, magnitude by a select tree over n/2 entries, scale sign folded in;
    "table": select tree over the whole (padded) table."""
    if fmt.is_int:
        return "int"
    if _is_e2m1(fmt.levels):
        return "e2m1"
    if _is_sign_symmetric(fmt.levels, fmt.bits):
        return "signsym"
    return "table"


# ---------------------------------------------------------------------------------------------------------
# The static problem.

@dataclasses.dataclass(frozen=True)
class Plane:
    width: int        # bits per code in this plane
    row_offset: int   # first packed row of this plane in qt.codes
    rows: int         # packed rows of this plane (= kp * width / 8)

    @property
    def rows_per_byte(self) -> int:
        return 8 // self.width


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of ``x (M, K) @ dequantize(qt) (K, N)`` (x's leading axes already flattened)."""

    m: int
    k: int
    n: int
    x_dtype: str
    format_name: str
    bits: int
    asym: bool
    group: int            # effective group size (K for per-channel)
    num_groups: int
    per_channel: bool
    kp: int               # K padded to a multiple of 8 (packed layout)
    packed_rows: int
    planes: tuple[Plane, ...]
    scale_dtype: str
    has_neg: bool         # scale_neg present (asym codebook)
    has_zero: bool        # zero present (asym INT)
    batched: bool         # qt has leading axes beyond (K, N)
    kind: str             # decode kind
    integer_scales: bool = False  # uint8 group scales times a per-column channel_scale (W·A8 only)

    @property
    def slots(self) -> int:
        return max(p.rows_per_byte for p in self.planes)

    @property
    def fmt(self) -> formats_lib.Format:
        return formats_lib.get_format(self.format_name)

    @property
    def n_scale_arrays(self) -> int:
        return 1 + int(self.has_neg) + int(self.has_zero)

    @classmethod
    def create(cls, x_shape, x_dtype, qt: QuantizedTensor) -> "Problem":
        fmt = qt.format
        k, n = qt.shape[-2:]
        if x_shape[-1] != k:
            raise InputError(f"x's last axis ({x_shape[-1]}) must equal the weight's in_features ({k})")
        m = int(math.prod(x_shape[:-1]))
        kp = packing.padded_rows(k)
        planes, off = [], 0
        for w in packing.plane_widths(fmt.bits):
            rows = kp * w // 8
            planes.append(Plane(w, off, rows))
            off += rows
        return cls(m=m, k=k, n=n, x_dtype=jnp.dtype(x_dtype).name, format_name=fmt.name, bits=fmt.bits,
                   asym=qt.asym, group=qt.effective_group_size, num_groups=qt.num_groups,
                   per_channel=qt.num_groups == 1, kp=kp, packed_rows=off, planes=tuple(planes),
                   scale_dtype=jnp.dtype(qt.scale.dtype).name, has_neg=qt.scale_neg is not None,
                   has_zero=qt.zero is not None, batched=qt.codes.ndim > 2, kind=decode_kind(fmt),
                   integer_scales=qt.integer_scales)


# ---------------------------------------------------------------------------------------------------------
# Block config.

@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Tiling of one kernel call. ``None`` fields are filled by `resolve` from the backend's defaults.

    block_m:   rows of x per tile (padded up to the sublane/MMA minimum).
    block_n:   output columns per tile (lane-dense: a multiple of 128 on TPU, a power of two on Triton).
    block_k:   K rows (unpacked weights) per pipeline step. TPU: a whole number of quantization groups whose
               scale rows form an aligned block; GPU: a power of two dividing, or a multiple of, the group.
    chunk_k:   TPU only: K rows dequantized per in-kernel sub-step (bounds the f32 intermediates in VMEM).
    num_warps / num_stages: Triton launch parameters; num_stages is also Mosaic GPU's pipeline depth.
    split_k:   Triton only: K is split over this many programs per output tile (decode: N / block_n programs
               alone cannot fill a GPU); partial float32 sums are added in XLA (deterministic).
    x_resident: TPU only: keep all of x's K tiles for the current M tile in VMEM (x is then read from HBM once
               per M tile instead of once per (M, N) tile). None = when it fits in `x_resident_max_bytes`.
    lookup:    codebook levels (FP/NF formats) from a 2**bits-entry table instead of a select tree (NF) or bit
               construction (FP4); about 4x fewer vector ops per weight for NF4 (`roofline.kernel_ops`), same
               numerics. Triton kernels (W4A16 and W·A8): one L1 load per weight, on by default. Mosaic TPU:
               a lane gather from a one-vreg-row table, opt-in (True) until measured on hardware; needs block_n
               a multiple of 128. Other kernels ignore it.
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    chunk_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    split_k: int | None = None
    x_resident: bool | None = None
    lookup: bool | None = None

    def replace(self, **kw) -> "BlockConfig":
        return dataclasses.replace(self, **kw)


def uses_lookup(prob: Problem, cfg: BlockConfig) -> bool:
    """Whether a kernel decodes codebook levels from a table (an extra table operand): ``cfg.lookup`` after
    `resolve` (Triton's defaults turn it on, Mosaic TPU's leave it off); INT codes never use one."""
    return prob.kind != "int" and bool(cfg.lookup)


x_resident_max_bytes = 4 << 20  # per buffer; x blocks are double-buffered.


def _pow2_ge(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _pow2_le(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _sublane_rows(x_dtype: str) -> int:
    # x rows per native tile: f32 (8,128), 16-bit (16,128).
    return 8 if jnp.dtype(x_dtype).itemsize == 4 else 16


def scale_block_rows(prob: Problem) -> int:
    """TPU: scale/zero rows per K step — the native tile height of the narrowest per-group array (uint8 zero
    points or integer scales: 32, 16-bit scales: 16, f32: 8), so every scale block DMA is tile-aligned."""
    if prob.has_zero or jnp.dtype(prob.scale_dtype).itemsize == 1:
        return 32
    return 8 if jnp.dtype(prob.scale_dtype).itemsize == 4 else 16


def tpu_default(prob: Problem) -> BlockConfig:
    p = prob.slots
    # One M tile covering all of x (a full-dim block: no padding rows in HBM) up to 256 rows, else 256-row tiles.
    bm = max(prob.m, 1) if prob.m <= 256 else 256
    bn = 512 if prob.n >= 512 else round_up(prob.n, 128)
    if bn > prob.n:
        bn = prob.n  # one full-width block (always a legal block shape)
    chunk = 128 * p  # every slot matrix chunk is 128 rows: lane-aligned x segments, one MXU pass deep.
    if prob.per_channel:
        bk = 2048 if p <= 4 else 4096
    else:
        bk = math.lcm(scale_block_rows(prob) * prob.group, chunk)
    if bk >= prob.kp or (prob.bits == 3 and (2 * prob.kp) % bk):
        # Single K step: every block spans the whole K extent (always a legal block shape). Also used for 3-bit
        # when the 1-bit plane's first row is not a multiple of its per-step block (2*Kp % block_k != 0).
        bk = prob.kp
        while bn > 128 and bn % 256 == 0 and prob.packed_rows * bn > (2 << 20):
            bn //= 2  # keep the whole-K code block <= 2 MiB per buffer
    return BlockConfig(block_m=bm, block_n=bn, block_k=bk, chunk_k=chunk, x_resident=None)


GPU_TARGET_PROGRAMS = 264  # ~2 waves of programs on a 132-SM H100


def triton_split_k(prob: Problem, bm: int, bn: int, bk: int) -> int:
    """Power of two: enough programs to fill the GPU, while the partial sums' extra traffic (written and read
    back as float32) stays under 3% of the packed weight's bytes."""
    programs = cdiv(prob.n, bn) * cdiv(prob.m, bm)
    tiles = cdiv(prob.kp, bk)
    weight_bytes = prob.packed_rows * prob.n
    split = 1
    while (split * 2 <= tiles and programs * split < GPU_TARGET_PROGRAMS
           and 2 * split * 2 * prob.m * prob.n * 4 <= 0.03 * weight_bytes):
        split *= 2
    return split


def gpu_default(prob: Problem, impl: str) -> BlockConfig:
    p = prob.slots
    if impl == "triton":
        # Decode: small M tile (tensor-core minimum is 16), wide N tiles, deep K.
        bm = 16 if prob.m <= 16 else (32 if prob.m <= 32 else (64 if prob.m <= 64 else 128))
        bn = min(128 if prob.m > 16 else 64, _pow2_ge(prob.n))
        bn = max(bn, 16)
        bk = 16 * p  # minimum: every slot matrix is >= 16 rows (tl.dot)
        target = 256 if prob.m > 64 else 512
        bk = max(bk, min(target, _pow2_ge(prob.kp)))
        if not prob.per_channel and prob.group < bk and bk % prob.group:
            bk = prob.group
        warps = 4 if prob.m <= 64 else 8
        stages = 3
        # Prefill tiles (128 x 256 at 3 stages) ask for 256 KiB of shared memory: Hopper has 227 KiB per CTA
        # (measured: RESOURCE_EXHAUSTED on an H200). Halve K first (groups stay whole: both are powers of two).
        while triton_smem_bytes(prob, bm, bn, bk, stages) > GPU_SMEM_BUDGET:
            if bk // 2 >= 16 * p and bk % 2 == 0:
                bk //= 2
            elif stages > 2:
                stages -= 1
            else:
                break
        return BlockConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                           split_k=triton_split_k(prob, bm, bn, bk), lookup=True)
    # Mosaic GPU (Hopper WGMMA): M tile = one warpgroup MMA (64 rows); every slot matrix a multiple of 64 rows
    # (WGMMA register layout); one scale row per K step (block_k divides the group); block_k divides Kp.
    bn = 128 if prob.n % 128 == 0 else 64
    bk = 64 * p
    limit = prob.kp if prob.per_channel else min(prob.group, prob.kp)
    while bk * 2 <= min(limit, 256) and prob.kp % (bk * 2) == 0 and (prob.per_channel or prob.group % (bk * 2) == 0):
        bk *= 2
    # 3 stages buy a second weight buffer (x's buffer is then released a step late, see
    # `mosaic_gpu_weight_buffers`): block_n is halved for them where 128 columns do not fit with 3 stages.
    while bn > 64 and mosaic_gpu_stages(prob, bn, bk) < 3:
        bn //= 2
    stages = mosaic_gpu_stages(prob, bn, bk)
    return BlockConfig(block_m=64, block_n=bn, block_k=bk, num_stages=stages)


def mosaic_gpu_stages(prob: Problem, bn: int, bk: int) -> int:
    """Mosaic GPU pipeline depth for a tiling: 3 (two weight buffers) when that fits `GPU_SMEM_BUDGET`, else 2."""
    return 3 if mosaic_gpu_smem_bytes(prob, 64, bn, bk, 3) <= GPU_SMEM_BUDGET else 2


def mosaic_gpu_weight_buffers(prob: Problem, bk: int, stages: int) -> int:
    """Weight tiles in shared memory: 2 (the next step's dequantization overlaps this step's WGMMA) when the
    pipeline keeps 3 or more steps in flight (x's buffer is then released a step late; the pipeline runs at most
    as many steps concurrently as there are K steps), else 1 (each step waits for its WGMMA)."""
    return 2 if min(stages, max(1, prob.kp // bk)) >= 3 else 1


# GPU dispatch: from this many rows of x on, "xla" (dequantize the weight once, then the library GEMM) ran faster
# than both GPU kernels on an H200 (BUILD_NOTES, "Second GPU run": INT4 and NF4, sym and asym, M = 128 and 1024).
# The kernels decode every weight tile again for each M tile; the GEMM path decodes once.
GPU_PREFILL_M = 128


def gpu_why_not_preferred(prob: Problem) -> str | None:
    """Dispatch's size rule for the GPU kernels (an explicit call runs any M)."""
    if prob.m >= GPU_PREFILL_M:
        return f"M={prob.m} >= {GPU_PREFILL_M}: dequantizing once and the library GEMM is faster"
    return None


GPU_SMEM_BUDGET = 200 * 1024  # default tilings stay under this (Hopper: 227 KiB per CTA; Ampere: 163 KiB)


def triton_smem_bytes(prob: Problem, bm: int, bn: int, bk: int, stages: int) -> int:
    """Upper estimate of the Triton kernel's shared memory: ``stages`` buffers of the pipelined x, code and
    scale tiles, plus the decoded weight tile that ``tl.dot`` takes from shared memory."""
    it = jnp.dtype(prob.x_dtype).itemsize
    scale_rows = 1 if prob.per_channel else cdiv(bk, prob.group)
    per_step = bm * bk * it + bk * prob.bits // 8 * bn + prob.n_scale_arrays * scale_rows * bn * 4
    return stages * per_step + bk * bn * it


def mosaic_gpu_smem_bytes(prob: Problem, bm: int, bn: int, bk: int, stages: int) -> int:
    """Shared memory of the Mosaic GPU kernel: pipelined x / code / scale tiles, the weight tile (double-buffered
    from 3 stages) and the output tile (Hopper allows 227 KiB per CTA)."""
    it = jnp.dtype(prob.x_dtype).itemsize
    per_step = bm * bk * it + bk * prob.bits // 8 * bn + prob.n_scale_arrays * bn * 4
    steps = min(stages, max(1, prob.kp // bk))  # the pipeline never buffers more steps than there are
    return steps * per_step + mosaic_gpu_weight_buffers(prob, bk, stages) * bk * bn * it + bm * bn * it


CPU_TILE_BYTES = 2 << 20  # "xla_scan": target size of one dequantized float32 tile (L2 + part of L3)


def cpu_scan_default(prob: Problem) -> BlockConfig:
    """"xla_scan": rows per chunk = whole groups (per-channel: 256-row units), about `CPU_TILE_BYTES` of float32
    tile, at least one unit."""
    unit = 256 if prob.per_channel else prob.group
    rows = max(1, CPU_TILE_BYTES // (4 * prob.n) // unit) * unit
    return BlockConfig(block_k=min(rows, cdiv(prob.k, unit) * unit))


def default_config(impl: str, prob: Problem) -> BlockConfig:
    if impl == "mosaic_tpu":
        return tpu_default(prob)
    if impl in ("triton", "mosaic_gpu"):
        return gpu_default(prob, impl)
    if impl == "xla_scan":
        return cpu_scan_default(prob)
    return BlockConfig()


def resolve(impl: str, prob: Problem, config: BlockConfig | None) -> BlockConfig:
    """Fills the unset fields of ``config`` with the backend defaults for ``prob``. Mosaic GPU's pipeline depth,
    when unset, is chosen for the merged tiles (a caller's wider block_n may not fit the default's 3 stages)."""
    merged = merge(config, default_config(impl, prob))
    if impl == "mosaic_gpu" and config is not None and config.num_stages is None:
        merged = merged.replace(num_stages=mosaic_gpu_stages(prob, merged.block_n, merged.block_k))
    return merged


def merge(config: BlockConfig | None, defaults: BlockConfig) -> BlockConfig:
    """``config`` with its unset fields taken from ``defaults``."""
    if config is None:
        return defaults
    return BlockConfig(**{f.name: (getattr(config, f.name) if getattr(config, f.name) is not None
                                   else getattr(defaults, f.name)) for f in dataclasses.fields(BlockConfig)})


# ---------------------------------------------------------------------------------------------------------
# The XLA-side activation transform.

def permute_x(x2d: jax.Array, *, mp: int, tiles: int, block_k: int, slots: int, segment: int) -> jax.Array:
    """``(M, K)`` -> ``(mp, tiles * slots * segment)``: per K tile of ``block_k`` rows, the columns of slot 0
    (tile rows 0, p, 2p, ...), then slot 1, ...; each slot segment zero-padded to ``segment`` columns, and
    rows/columns past (M, K) zero. Column ``t*slots*segment + s*segment + r`` holds x[:, t*block_k + r*p + s].
    """
    m, k = x2d.shape
    per = block_k // slots
    x2d = jnp.pad(x2d, ((0, mp - m), (0, tiles * block_k - k)))
    xt = x2d.reshape(mp, tiles, per, slots).transpose(0, 1, 3, 2)  # (mp, T, p, per)
    if segment != per:
        xt = jnp.pad(xt, ((0, 0), (0, 0), (0, 0), (0, segment - per)))
    return xt.reshape(mp, tiles * slots * segment)
