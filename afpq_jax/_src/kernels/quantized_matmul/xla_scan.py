"""The CPU path: ``x @ W`` as a `lax.scan` over K chunks of whole groups, so only one dequantized ``(chunk, N)``
float tile is live at a time (it stays in cache) instead of the whole float weight.

Per chunk of ``block_k`` rows (a multiple of the 8-row packing unit, and a multiple or a divisor of the group)
every bit plane's rows are one contiguous slice (`afpq_jax._src.packing`). The chunk is decoded
slot by slot, as the Pallas kernels do (`base` "Slots"): slot ``s`` holds the chunk rows ``s, s + p, ...`` and
comes out of the code bytes with shifts and masks only, so there is no interleave back into row order; x's
columns are permuted to match instead (`base.permute_x`, once for the whole call). Values come from
`decode.dequant`, bit-identical to `dequantize` (tested there), except the "table" kind (NF4 / NF3), where the
16-entry lookup of `quantizer.decode` is faster on CPU than the select tree the kernels need. The decoded slots,
rounded to x's dtype, are contracted with the matching slots of the permuted x (one dot per slot, float32
accumulation): only the summation order differs from the "xla" reference.

Explicit-only (`implementation="xla_scan"`): measured no faster than "xla" on the 2-core CPU once both ran
inside one jitted loop (BUILD_NOTES, "CPU path"); the C++ kernel ("cpu") is the CPU default. It stays as the
pure-XLA statement of the slot decode and for backends where a custom call is unwelcome.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afpq_jax._src import packing, quantizer
from afpq_jax._src.kernels.quantized_matmul import decode
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, cdiv, permute_x
from afpq_jax._src.kernels.quantized_matmul.xla import dot_precision
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import GroupParams

TILE_BYTES = 2 << 20  # target size of one dequantized float32 tile (L2 + part of L3)


def default_config(prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
    """Rows per chunk = whole groups (per-channel: 256-row units), about `TILE_BYTES` of float32 tile, at least
    one unit."""
    unit = 256 if prob.per_channel else prob.group
    rows = max(1, TILE_BYTES // (4 * prob.n) // unit) * unit
    return BlockConfig(block_k=min(rows, cdiv(prob.k, unit) * unit))


def why_unsupported(prob: Problem, block_k: int) -> str | None:
    if prob.batched:
        return "stacked (batched) weights: use xla"
    if block_k % packing.PACK_ROWS:
        return f"block_k={block_k} must be a multiple of {packing.PACK_ROWS} (the packing unit)"
    if not prob.per_channel and block_k % prob.group and prob.group % block_k:
        return f"block_k={block_k} must be a multiple or a divisor of the group size {prob.group}"
    if not prob.per_channel and prob.group % prob.slots:
        return f"group size {prob.group} is not a multiple of {prob.slots} (rows per byte at {prob.bits} bits)"
    return None


def _chunk_planes(qt: QuantizedTensor, prob: Problem, chunks: int, c: int) -> list[jax.Array]:
    """The code planes as (chunks, rows per chunk, N) uint8, in `decode.slot_codes`' order (3-bit: the 2-bit
    plane's even and odd byte rows, then the 1-bit plane)."""
    out = []
    for plane in prob.planes:
        p = plane.rows_per_byte
        rows = qt.codes[plane.row_offset:plane.row_offset + plane.rows]
        rows = jnp.pad(rows, ((0, chunks * c // p - plane.rows), (0, 0))).reshape(chunks, c // p, prob.n)
        if prob.bits == 3 and plane.width == 2:
            out += [rows[:, 0::2], rows[:, 1::2]]
        else:
            out.append(rows)
    return out


def _chunk_scales(qt: QuantizedTensor, prob: Problem, chunks: int, c: int) -> list[jax.Array | None]:
    """pos / neg / zero as (chunks, groups per chunk, 1, N) float32 (per-channel: one group per chunk)."""
    pos, neg = qt.float_scales()
    zero = None if qt.zero is None else qt.zero.astype(jnp.float32)
    if prob.per_channel:
        return [None if a is None else jnp.broadcast_to(a[None, :, None, :], (chunks, 1, 1, prob.n))
                for a in (pos, neg, zero)]
    if c < prob.group:  # a chunk is part of one group: its scale row repeats
        return [None if a is None else jnp.repeat(a, prob.group // c, axis=0)[:chunks, None, None, :]
                for a in (pos, neg, zero)]
    per_chunk = c // prob.group
    pad = chunks * per_chunk - prob.num_groups
    return [None if a is None else jnp.pad(a, ((0, pad), (0, 0))).reshape(chunks, per_chunk, 1, prob.n)
            for a in (pos, neg, zero)]


def quantized_matmul_scan(x2d: jax.Array, qt: QuantizedTensor, prob: Problem, block_k: int) -> jax.Array:
    """(M, K) @ W -> (M, N) in x's dtype, float32 accumulation, one chunk of ``block_k`` rows per scan step."""
    c, n, m, p = block_k, prob.n, prob.m, prob.slots
    chunks = cdiv(prob.k, c)
    planes = _chunk_planes(qt, prob, chunks, c)
    scales = _chunk_scales(qt, prob, chunks, c)
    xs = permute_x(x2d, mp=m, tiles=chunks, block_k=c, slots=p, segment=c // p)
    xs = xs.reshape(m, chunks, c).transpose(1, 0, 2)  # (chunks, M, [slot 0 rows | slot 1 rows | ...])
    precision = dot_precision(x2d.dtype)
    fmt = qt.format

    def step(acc, inputs):
        x_t, planes_t, (pos, neg, zero) = inputs
        per_group = c // p if prob.per_channel or c < prob.group else prob.group // p  # slot rows per scale row
        codes = [s.reshape(-1, per_group, n) for s in decode.slot_codes(prob, list(planes_t))]
        if prob.kind == "table":
            params = GroupParams(pos, neg, zero)
            slots = [quantizer.decode(fmt, prob.asym, s, params) for s in codes]
        else:
            sc = decode.prepare_scales(prob, pos, neg, zero)
            slots = [decode.dequant(prob, s if prob.kind == "int" else s.astype(jnp.int32), sc) for s in codes]
        x_t = x_t.reshape(m, p, c // p)
        for i, s in enumerate(slots):
            acc = acc + jax.lax.dot_general(x_t[:, i], s.reshape(c // p, n).astype(x2d.dtype),
                                            (((1,), (0,)), ((), ())), precision=precision,
                                            preferred_element_type=jnp.float32)
        return acc, None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (xs, planes, scales))
    return acc.astype(x2d.dtype)
