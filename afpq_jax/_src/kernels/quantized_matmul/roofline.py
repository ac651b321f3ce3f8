"""Memory roofline of ``x @ dequantize(qt)`` for decode shapes, and the HBM traffic each kernel's tiling implies.

Decode (M = 1..16) is bandwidth-bound: a bf16 matmul moves 2 bytes per weight, a packed one
``bits/8 + (scale arrays * scale bytes + zero-point bytes) / group`` bytes, so the speedup over bf16 is at most
``16 / bits_per_weight`` (x and the output add ``(M*K + M*N) * 2`` bytes to both, negligible for M <= 16 at
K, N >= 1024 and included in `decode_bound`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend as jex
import jax.numpy as jnp

from afpq_jax._src import formats as formats_lib
from afpq_jax._src import packing
from afpq_jax._src.kernels.quantized_matmul import base
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, cdiv

# HBM bandwidth (bytes/s) by device_kind (substring match, first hit wins). Public spec-sheet numbers.
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("TPU v5 lite", 819e9), ("TPU v5e", 819e9), ("TPU v5p", 2765e9), ("TPU v5", 2765e9),
    ("TPU v6 lite", 1640e9), ("TPU v6e", 1640e9), ("TPU v4 lite", 614e9), ("TPU v4", 1228e9),
    ("TPU7x", 7380e9),
    ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12), ("H20", 4.0e12),
    ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100-PCIE-80GB", 1.935e12),
    ("A100", 1.555e12), ("L40S", 864e9), ("L4", 300e9), ("A10G", 600e9), ("RTX 4090", 1008e9),
)


def hbm_bandwidth(device_kind: str) -> float | None:
    for key, bw in HBM_BANDWIDTH:
        if key.lower() in device_kind.lower():
            return bw
    return None


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    codes_bits: float   # per weight
    scale_bits: float   # per weight (scales, s_neg, zero points)

    @property
    def bits(self) -> float:
        return self.codes_bits + self.scale_bits

    @property
    def bound_vs_bf16(self) -> float:
        return 16.0 / self.bits


def weight_bits(fmt: str, group: int | None, asym: bool, *, k: int = 4096, scale_bytes: int = 2) -> WeightBytes:
    """Bits per weight of a packed (K, N) weight: codes (incl. K padding to 8) plus per-group arrays."""
    f = formats_lib.get_format(fmt)
    g = k if group is None else min(group, k)
    n_groups = math.ceil(k / g)
    codes = packing.padded_rows(k) * f.bits / k
    per_group = 8 * scale_bytes * (1 + (asym and not f.is_int)) + (8 if asym and f.is_int else 0)
    return WeightBytes(codes, per_group * n_groups / k)


def decode_bound(fmt: str, group: int | None, asym: bool, m: int, k: int, n: int, x_bytes: int = 2) -> float:
    """Upper bound on speedup over a bf16 matmul of the same shape: ratio of HBM bytes (weights + x + out)."""
    wb = weight_bits(fmt, group, asym, k=k)
    act = (m * k + m * n) * x_bytes
    return (2 * k * n + act) / (wb.bits / 8 * k * n + act)


def kernel_hbm_bytes(impl: str, prob: Problem, cfg: BlockConfig) -> dict[str, float]:
    """HBM bytes the kernel's grid moves, by operand (reads of partial edge blocks counted in full).

    mosaic_tpu: every code/scale block is DMA'd once per (M tile, N tile, K step) — i.e. once per M tile; x once
    per M tile when resident, else once per N tile. triton / mosaic_gpu: each program reads its N slab of
    codes and scales once; x is re-read per N tile by the grid, from L2 for decode-sized x (``x_l2``, not in
    ``total``).
    ``x_prep``: the XLA pass that writes x's per-tile column permutation (read x + write the copy); Triton reads
    x unpermuted and has none. Triton's split-K partial sums count in ``out`` above decode sizes; at M <= 16
    they are L2-sized (``partials_l2``, not in ``total``).
    """
    itemsize = jnp.dtype(prob.x_dtype).itemsize
    s_item = jnp.dtype(prob.scale_dtype).itemsize
    per_group_bytes = s_item * (1 + prob.has_neg) + prob.has_zero
    if impl == "mosaic_tpu":
        from afpq_jax._src.kernels.quantized_matmul import mosaic_tpu
        pl_ = mosaic_tpu.plan(prob, cfg)
        m_tiles, n_tiles = pl_.mp // pl_.bm, cdiv(prob.n, pl_.bn)
        ncols = n_tiles * pl_.bn
        code_rows = prob.packed_rows if pl_.tiles == 1 else sum(
            min(pl_.tiles * (pl_.bk // pl.rows_per_byte), prob.packed_rows - pl.row_offset) for pl in prob.planes)
        codes = m_tiles * code_rows * min(ncols, prob.n)
        groups = prob.num_groups
        scales = m_tiles * groups * prob.n * per_group_bytes
        xp = pl_.tiles * pl_.mp * pl_.slots * pl_.seg * itemsize
        x = xp * (1 if pl_.x_resident else n_tiles)
        x_prep = prob.m * prob.k * itemsize + xp  # the XLA permutation pass: read x, write the permuted copy
        out = pl_.mp * prob.n * itemsize
    else:
        bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
        # Triton masks rows past M (no padding); Mosaic GPU pads M to the 64-row WGMMA tile in HBM.
        mp = prob.m if impl == "triton" else base.round_up(max(prob.m, 1), bm)
        m_tiles, n_tiles = cdiv(mp, bm), cdiv(prob.n, bn)
        tiles = cdiv(prob.kp, bk)
        codes = m_tiles * prob.packed_rows * prob.n
        scales = m_tiles * prob.num_groups * prob.n * per_group_bytes
        # Every program reads its M tile of x for all of K: n_tiles reads of x in all. Decode-sized x (<= a few
        # MiB) stays in the 50 MiB L2 after the first, so HBM sees x once; the rest is L2 traffic (`x_l2`).
        if impl == "triton":  # reads x as it is (strided loads in the kernel): no permuted, padded copy
            x, x_prep = prob.m * prob.k * itemsize, 0
        else:
            x = mp * tiles * bk * itemsize
            x_prep = prob.m * prob.k * itemsize + mp * tiles * bk * itemsize
        x_l2 = (n_tiles - 1) * x
        out = mp * prob.n * itemsize
        split = 1
        if impl == "triton":
            from afpq_jax._src.kernels.quantized_matmul.triton import effective_split
            split = effective_split(prob, cfg)[0]
        partials = 2 * split * mp * prob.n * 4 if split > 1 else 0  # float32 partial sums written, read back
        partials_l2 = partials if prob.m <= 16 else 0  # decode's are L2-sized (at most 12 MiB): no HBM traffic
        out += partials - partials_l2
        return dict(codes=float(codes), scales=float(scales), x=float(x), x_prep=float(x_prep), out=float(out),
                    total=float(codes + scales + x + x_prep + out), x_l2=float(x_l2), partials_l2=float(partials_l2))
    return dict(codes=float(codes), scales=float(scales), x=float(x), x_prep=float(x_prep), out=float(out),
                total=float(codes + scales + x + x_prep + out))


def ideal_bytes(prob: Problem) -> float:
    """Bytes a perfect kernel moves: the packed weight once, x once, the output once (unpadded)."""
    itemsize = jnp.dtype(prob.x_dtype).itemsize
    s_item = jnp.dtype(prob.scale_dtype).itemsize
    per_group_bytes = s_item * (1 + prob.has_neg) + prob.has_zero
    return (prob.packed_rows * prob.n + prob.num_groups * prob.n * per_group_bytes
            + (prob.m * prob.k + prob.m * prob.n) * itemsize)


# ---------------------------------------------------------------------------------------------------------
# ALU side: vector operations per weight in a kernel's traced body.

# Primitives that move or re-lay data rather than compute on it (register broadcasts and reshapes are free or
# nearly so inside a kernel; memory ops are counted apart).
_LAYOUT = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "slice", "concatenate",
                     "split", "transpose"})
_MEMORY = frozenset({"get", "swap", "load", "masked_load", "masked_swap", "store"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call"})
_KERNELS = frozenset({"pallas_call", "core_map", "mpmd_map"})
_TABLE_MAX = 256

# Issue cost per element relative to a float32 add / multiply / FMA, from the per-SM instruction throughputs of
# NVIDIA's Hopper (CUDA C++ Programming Guide, "Arithmetic Instructions", compute capability 9.0): float32
# arithmetic 128 per clock; 32-bit integer arithmetic, compares, bitwise ops and shifts 64; conversions and
# special functions 16. A bitcast is a register reinterpretation (free). Other chips differ in the numbers, not in
# the order: a convert is never as cheap as an add.
_FLOAT_ARITHMETIC = frozenset({"add", "sub", "mul", "max", "min", "neg", "abs", "fma"})
_SPECIAL = frozenset({"exp", "exp2", "log", "tanh", "logistic", "rsqrt", "sqrt", "div", "pow", "erf"})
_FREE = frozenset({"bitcast_convert_type"})
ISSUE_COST = {"float": 1.0, "integer": 2.0, "convert": 8.0, "special": 8.0, "free": 0.0}


def issue_class(primitive: str, dtype) -> str:
    """The throughput class of an elementwise primitive with output ``dtype`` (keys of `ISSUE_COST`)."""
    if primitive in _FREE:
        return "free"
    if primitive == "convert_element_type":
        return "convert"
    if primitive in _SPECIAL:
        return "special"
    if primitive in _FLOAT_ARITHMETIC and jnp.issubdtype(dtype, jnp.floating):
        return "float"
    return "integer"  # integer arithmetic, compares, selects, bitwise ops and shifts


@dataclasses.dataclass(frozen=True)
class KernelOps:
    """Vector work of a kernel's weight path, per weight it multiplies (static: counted in the traced kernel
    body, before compiler simplification; loops count their body once, and the weights of the dots in the
    same body are the denominator).

    ops:     elementwise arithmetic / logic / select / convert elements per weight (the ALU budget).
    loads:   elements read at an array of indices from 1-D refs of at most `_TABLE_MAX` elements (table
             lookups) per weight.

    The denominator sums the weights of every multiply, so a kernel that multiplies each weight tile twice (the
    W·A8 kernels' AFPQ split into positive and negative levels) reports half its ops per weight.
    by_primitive: ops per weight by primitive name.
    weighted: the same ops, each weighted by its throughput class (`issue_class`): the ALU budget in float32
             FMA slots, where a convert counts 8 and an integer op 2.
    """

    ops: float
    loads: float
    by_primitive: dict[str, float]
    weighted: float = 0.0  # ops weighted by `ISSUE_COST` (float32-FMA issue slots per weight)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for s in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(s, jex.core.ClosedJaxpr):
                yield s.jaxpr
            elif isinstance(s, jex.core.Jaxpr):
                yield s


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _wgmma_b_shape(eqn) -> tuple[int, ...]:
    """Shape of the B operand a Mosaic GPU ``wgmma_ref`` multiplies: the B ref (e.g. one buffer of a
    double-buffered tile) after its indexer, rebuilt from the equation's transform trees; the whole ref when it
    has none."""
    leaves = list(eqn.invars[3:])
    transforms = []
    for name in ("acc_transforms_tree", "a_transforms_tree", "b_transforms_tree"):
        tree = eqn.params.get(name)
        n = 0 if tree is None else tree.num_leaves
        transforms.append(() if tree is None else jax.tree_util.tree_unflatten(tree, leaves[:n]))
        leaves = leaves[n:]
    indexers = [t for t in transforms[2] if hasattr(t, "get_indexer_shape")]
    return tuple(indexers[-1].get_indexer_shape()) if indexers else tuple(eqn.invars[2].aval.shape)


def _dot_weights(eqn) -> int:
    """Weights one matrix-multiply equation consumes: its right operand (dot_general), B (wgmma), or, for a
    GEMV written as products summed over K (a ``reduce_sum`` of a (rows, K, N) array over axis 1), K x N."""
    if eqn.primitive.name == "dot_general":
        return _size(eqn.invars[1].aval)
    if eqn.primitive.name == "wgmma_ref":
        return int(math.prod(_wgmma_b_shape(eqn)))
    if eqn.primitive.name == "reduce_sum" and len(eqn.invars[0].aval.shape) == 3 and eqn.params["axes"] == (1,):
        return int(math.prod(eqn.invars[0].aval.shape[1:]))
    return 0


def kernel_ops(jaxpr) -> KernelOps:
    """`KernelOps` of the Pallas kernels in ``jaxpr`` (a ``jax.make_jaxpr`` of a call of the op). Every body
    inside a kernel that holds matrix multiplies contributes its vector ops (calls such as ``jnp.where``'s are
    inlined; loops are bodies of their own) over the weights its multiplies consume."""
    totals: dict[tuple[str, str], int] = {}  # elements by (primitive, `issue_class`)
    loads = weights = 0

    def own(j, counts: dict[tuple[str, str], int]) -> tuple[int, int]:
        """(dot weights, indexed-load elements) of ``j``'s own equations, calls inlined, loops not; elementwise
        elements into ``counts`` by (primitive, throughput class)."""
        w = indexed = 0
        for e in j.eqns:
            name = e.primitive.name
            if name in _CALLS:
                for s in _sub_jaxprs(e):
                    dw, di = own(s, counts)
                    w, indexed = w + dw, indexed + di
                continue
            size = sum(_size(v.aval) for v in e.outvars)
            if _dot_weights(e):
                w += _dot_weights(e)
            elif name in _MEMORY:
                ref = e.invars[0].aval
                gathered = any(_size(v.aval) > 1 and jnp.issubdtype(v.aval.dtype, jnp.integer)
                               for v in e.invars[1:])
                if name != "swap" and gathered and len(ref.shape) == 1 and _size(ref) <= _TABLE_MAX:
                    indexed += size  # a small 1-D ref read at an array of indices: a table lookup
            elif name not in _LAYOUT and size > 1 and next(_sub_jaxprs(e), None) is None:
                key = (name, issue_class(name, e.outvars[0].aval.dtype))
                counts[key] = counts.get(key, 0) + size
        return w, indexed

    def walk(j, inside: bool):
        nonlocal loads, weights
        if inside:
            counts: dict[tuple[str, str], int] = {}
            w, indexed = own(j, counts)
            if w:  # bodies without a multiply (index math, epilogues) are not per-weight work
                weights, loads = weights + w, loads + indexed
                for k, v in counts.items():
                    totals[k] = totals.get(k, 0) + v
        for e in j.eqns:
            if inside and e.primitive.name in _CALLS:
                continue  # already inlined into this body
            kernel = inside or e.primitive.name in _KERNELS
            for s in _sub_jaxprs(e):
                walk(s, kernel)

    walk(getattr(jaxpr, "jaxpr", jaxpr), False)
    if not weights:
        raise ValueError("no matrix multiply found inside a Pallas kernel in this jaxpr")
    by_name: dict[str, int] = {}
    for (name, _), v in totals.items():
        by_name[name] = by_name.get(name, 0) + v
    return KernelOps(ops=sum(totals.values()) / weights, loads=loads / weights,
                     by_primitive={k: v / weights for k, v in sorted(by_name.items())},
                     weighted=sum(v * ISSUE_COST[cls] for (_, cls), v in totals.items()) / weights)
