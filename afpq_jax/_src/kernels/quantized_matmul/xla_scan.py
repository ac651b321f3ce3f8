"""The CPU path: ``x @ W`` as a `lax.scan` over K chunks of whole groups, so only one dequantized ``(chunk, N)``
float tile is live at a time (it stays in cache) instead of the whole float weight.

Per chunk of ``block_k`` rows (a multiple of the group and of the 8-row packing unit; per-channel weights: any
multiple of 8): the chunk's rows of every bit plane are one contiguous slice (`afpq_jax._src.packing`), so they
are unpacked with `packing.unpack` and decoded with `quantizer.decode` — the project's one definition of the
values, nothing re-implemented — and contracted with x's matching columns into a float32 accumulator. The
dequantized values equal `dequantize(qt)` exactly; only the summation order differs from the "xla" reference
(sums of per-chunk partial dots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afpq_jax._src import packing, quantizer
from afpq_jax._src.kernels.quantized_matmul.base import Problem, cdiv
from afpq_jax._src.kernels.quantized_matmul.xla import dot_precision
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import GroupParams

def why_unsupported(prob: Problem, block_k: int) -> str | None:
    if prob.batched:
        return "stacked (batched) weights: use xla"
    if block_k % packing.PACK_ROWS:
        return f"block_k={block_k} must be a multiple of {packing.PACK_ROWS} (the packing unit)"
    if not prob.per_channel and block_k % prob.group:
        return f"block_k={block_k} must hold whole groups of {prob.group}"
    return None


def quantized_matmul_scan(x2d: jax.Array, qt: QuantizedTensor, prob: Problem, block_k: int) -> jax.Array:
    """(M, K) @ W -> (M, N) in x's dtype, float32 accumulation, one chunk of ``block_k`` rows per scan step."""
    fmt = qt.format
    c, n, m = block_k, prob.n, prob.m
    chunks = cdiv(prob.k, c)
    kp = chunks * c
    planes, start = [], 0
    for w in packing.plane_widths(fmt.bits):
        p = 8 // w
        rows = prob.kp // p
        plane = qt.codes[start:start + rows]
        plane = jnp.pad(plane, ((0, kp // p - rows), (0, 0)))
        planes.append(plane.reshape(chunks, c // p, n))
        start += rows
    pos, neg = qt.float_scales()
    zero = None if qt.zero is None else qt.zero.astype(jnp.float32)
    if prob.per_channel:
        per_chunk = 1
        scales = [None if a is None else jnp.broadcast_to(a[None], (chunks, 1, n)) for a in (pos, neg, zero)]
    else:
        per_chunk = c // prob.group
        pad = chunks * per_chunk - prob.num_groups
        scales = [None if a is None else jnp.pad(a, ((0, pad), (0, 0))).reshape(chunks, per_chunk, n)
                  for a in (pos, neg, zero)]
    xs = jnp.pad(x2d, ((0, 0), (0, kp - prob.k))).reshape(m, chunks, c).transpose(1, 0, 2)
    precision = dot_precision(x2d.dtype)

    def step(acc, inputs):
        x_t, plane_t, s_t = inputs
        codes = packing.unpack(jnp.concatenate(plane_t, axis=0) if len(plane_t) > 1 else plane_t[0], fmt.bits, c)
        params = GroupParams(*(None if a is None else a[:, None, :] for a in s_t))
        w = quantizer.decode(fmt, qt.asym, codes.reshape(per_chunk, c // per_chunk, n), params).reshape(c, n)
        y = jax.lax.dot_general(x_t, w.astype(x2d.dtype), (((1,), (0,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)
        return acc + y, None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (xs, planes, scales))
    return acc.astype(x2d.dtype)
