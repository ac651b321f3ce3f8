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
    split_k_atomic: Triton W4A16 only: the splits add their partial sums into one float32 output with atomic
               adds instead (no (split, M, N) array and no separate XLA sum; the order of the adds, and so the
               last bits of a result, may differ between runs). Off unless set.
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
    split_k_atomic: bool | None = None
    x_resident: bool | None = None
    lookup: bool | None = None

    def replace(self, **kw) -> "BlockConfig":
        return dataclasses.replace(self, **kw)


def uses_lookup(prob: Problem, cfg: BlockConfig) -> bool:
    """Whether a kernel decodes codebook levels from a table (an extra table operand): ``cfg.lookup`` after
    `resolve` (Triton's defaults turn it on, Mosaic TPU's leave it off); INT codes never use one."""
    return prob.kind != "int" and bool(cfg.lookup)


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


def pow2_ge(v: int) -> int:
    """The smallest power of two >= v."""
    return 1 << max(0, (v - 1).bit_length())


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
