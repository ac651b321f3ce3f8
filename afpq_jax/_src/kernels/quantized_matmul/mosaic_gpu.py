"""Mosaic GPU kernel (Hopper, warpgroup semantics): TMA-pipelined packed tiles, dequantization in registers,
bf16/f16 tile staged in swizzled shared memory, WGMMA with a float32 register accumulator.

One CTA (one warpgroup) per (N tile, 64-row M tile). ``plgpu.emit_pipeline`` streams, per K step of
``block_k`` rows, x's permuted ``(64, block_k)`` tile (swizzled, WGMMA operand A), each bit plane's
``(block_k / rows_per_byte, block_n)`` uint8 tile and the step's scale rows (and s_neg / zero-point rows): the
one row of the group containing the step when ``block_k`` divides the group, else the step's ``block_k / group``
rows, each slot row taking its group's row by a select (one per further group). Each scale row is read once per
(K step, N tile). The
warpgroup loads the code tile into registers (WGMMA layout), unpacks the slot matrices (3-bit: the 2-bit
plane is read through an ``(R/2, 2N)`` view of the codes — a free reshape of a row-major array — whose column
halves are the even and odd byte rows), decodes (`decode.dequant`), writes the ``block_k x block_n`` tile in x's dtype into shared memory
(slot s at rows ``[s*block_k/p, (s+1)*block_k/p)``, matching x's column permutation) and issues
``wgmma(acc, x_tile, w_tile)``. With 3 pipeline stages and at least 3 K steps the weight tile is
double-buffered: the WGMMA of step k runs while step k + 1 dequantizes into the other buffer
(``wgmma_wait(1)``), and x's buffer is released a step late for it. The defaults take 3 stages wherever shared
memory allows, halving block_n to 64 for them if need be (4-bit groups >= 256 and per-channel, 2-bit); 3-bit's
512-row steps keep 2 stages, and then each step waits for its WGMMA.

Scope (declined cases fall back, see `why_unsupported`): x in bf16/f16 (WGMMA has no exact f32 path); slot
matrices of a multiple of 64 rows per step (the WGMMA register layout: block_k a multiple of 64 * slots); the
group and block_k dividing one another; N a multiple of 64; INT3 with zero points (faulted on an H200). When block_k does not divide K (e.g. K = 576 with 128-row
steps), the kernel runs the whole steps and writes float32, and the remaining rows are added by one small XLA
dot (`_tail_matmul`); 3-bit needs 2*Kp to be a multiple of block_k for its plane blocks. M is padded to 64:
this is the prefill kernel; decode shapes are Triton's (dispatch tries Triton first).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from afpq_jax._src import packing, quantizer
from afpq_jax._src.kernels.quantized_matmul import base, decode
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, round_up
from afpq_jax._src.kernels.quantized_matmul.xla import dot_precision

WGMMA_ROWS = 64


def smem_bytes(prob: Problem, bm: int, bn: int, bk: int, stages: int) -> int:
    """Shared memory of the kernel: pipelined x / code / scale tiles, the weight tile (double-buffered from 3
    stages) and the output tile (Hopper allows 227 KiB per CTA)."""
    it = jnp.dtype(prob.x_dtype).itemsize
    per_step = bm * bk * it + bk * prob.bits // 8 * bn + prob.n_scale_arrays * bn * 4
    steps = min(stages, max(1, prob.kp // bk))  # the pipeline never buffers more steps than there are
    return steps * per_step + weight_buffers(prob, bk, stages) * bk * bn * it + bm * bn * it


def weight_buffers(prob: Problem, bk: int, stages: int) -> int:
    """Weight tiles in shared memory: 2 (the next step's dequantization overlaps this step's WGMMA) when the
    pipeline keeps 3 or more steps in flight (x's buffer is then released a step late; the pipeline runs at most
    as many steps concurrently as there are K steps), else 1 (each step waits for its WGMMA)."""
    return 2 if min(stages, max(1, prob.kp // bk)) >= 3 else 1


def stages_for(prob: Problem, bn: int, bk: int) -> int:
    """Pipeline depth for a tiling: 3 (two weight buffers) when that fits `base.GPU_SMEM_BUDGET`, else 2."""
    return 3 if smem_bytes(prob, 64, bn, bk, 3) <= base.GPU_SMEM_BUDGET else 2


def default_config(prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
    """Mosaic GPU's tiling (Hopper WGMMA): M tile = one warpgroup MMA (64 rows); every slot matrix a multiple of
    64 rows (WGMMA register layout); one scale row per K step (block_k divides the group); block_k divides Kp.
    The pipeline depth, when ``config`` (the caller's partial tiling) leaves it unset, is chosen for the merged
    tiles (a caller's wider block_n may not fit 3 stages)."""
    p = prob.slots
    bn = 128 if prob.n % 128 == 0 else 64
    bk = 64 * p
    limit = prob.kp if prob.per_channel else min(prob.group, prob.kp)
    while bk * 2 <= min(limit, 256) and prob.kp % (bk * 2) == 0 and (prob.per_channel or prob.group % (bk * 2) == 0):
        bk *= 2
    # 3 stages buy a second weight buffer (x's buffer is then released a step late, see `weight_buffers`):
    # block_n is halved for them where 128 columns do not fit with 3 stages.
    while bn > 64 and stages_for(prob, bn, bk) < 3:
        bn //= 2
    default = BlockConfig(block_m=64, block_n=bn, block_k=bk, num_stages=stages_for(prob, bn, bk))
    if config is not None and config.num_stages is None:
        merged = base.merge(config, default)
        default = default.replace(num_stages=stages_for(prob, merged.block_n, merged.block_k))
    return default


def device_refusal(devices=None) -> str | None:
    """Why the visible GPU cannot run this kernel, or None. WGMMA (sm_90a) exists on compute capability 9.x only
    (Hopper: not Ampere / Ada, not Blackwell's tcgen05, not ROCm), and without this check such a device failed at
    compile time instead of falling back. Only a GPU is checked: on CPU the kernel runs in interpret mode."""
    device = (jax.devices() if devices is None else devices)[0]
    if device.platform != "gpu":
        return None
    capability = str(getattr(device, "compute_capability", "") or "")
    major = capability.split(".")[0]
    if not major.isdigit():
        return f"needs an NVIDIA GPU of compute capability 9.x (Hopper); {device.device_kind} is not a CUDA device"
    if int(major) != 9:
        return (f"needs compute capability 9.x (Hopper WGMMA); {device.device_kind} has {capability}")
    return None


def why_unsupported(prob: Problem, cfg: BlockConfig) -> str | None:
    if prob.batched:
        return "stacked (batched) weights; vmap the op over the stack instead"
    if prob.x_dtype not in ("bfloat16", "float16"):
        return f"x dtype {prob.x_dtype}: WGMMA has no exact float32 path (TF32 only)"
    p = prob.slots
    bk, bn = cfg.block_k, cfg.block_n
    if cfg.block_m != WGMMA_ROWS:
        return f"block_m={cfg.block_m} must be {WGMMA_ROWS} (one warpgroup MMA)"
    if bn not in (64, 128, 256) or prob.n % bn:
        return f"N={prob.n} must be a multiple of block_n={bn} (64, 128 or 256)"
    if bk % p or (bk // p) % WGMMA_ROWS:
        return (f"block_k={bk} gives {bk // p}-row slot matrices; the WGMMA register layout needs a multiple of "
                f"{WGMMA_ROWS} (block_k a multiple of {WGMMA_ROWS * p})")
    if prob.kp < bk:
        return f"K (padded to {prob.kp}) is shorter than one K step (block_k={bk})"
    if prob.bits == 3 and (2 * prob.kp) % bk:
        return (f"3-bit: the 1-bit plane starts at packed row {prob.kp // 4}, not a multiple of its step block "
                f"({bk // 8} rows) for block_k={bk}")
    if prob.bits == 3 and prob.has_zero:
        # Device check on an H200 (2026-11-28): CUDA_ERROR_MISALIGNED_ADDRESS for INT3 asym (g512); NF3/FP3 asym
        # and INT2/INT4 with zero points ran correctly. Declined until the zero-point tile is fixed.
        return "3-bit with zero points (INT3 asym): misaligned shared-memory access on Hopper; use triton"
    if prob.bits == 3 and prob.kp % 16:
        return f"3-bit needs K padded to a multiple of 16 (the 2-bit plane is read as row pairs), got {prob.kp}"
    smem = smem_bytes(prob, cfg.block_m, bn, bk, cfg.num_stages or 2)
    if smem > 227 * 1024:
        return f"tiles need {smem} bytes of shared memory (> 227 KiB)"
    if not prob.per_channel and prob.group % bk and (bk % prob.group or prob.group % p):
        return (f"group size {prob.group} and block_k={bk}: one must divide the other (whole groups per K step, "
                f"or whole K steps per group)")
    return None


def groups_per_step(prob: Problem, bk: int) -> int:
    """Scale rows one K step reads: 1 when the group spans the step (or per-channel), else block_k / group."""
    return 1 if prob.per_channel or prob.group >= bk else bk // prob.group


def _transforms(cols: int, itemsize: int):
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(*refs, w_smem, o_smem, prob: Problem, cfg: BlockConfig, tiles: int, stages: int, buffers: int,
            interpret: bool):
    it = iter(refs)
    x_gmem, c_gmem = next(it), next(it)
    c2_gmem = next(it) if prob.bits == 3 else None
    s_gmem = next(it)
    sn_gmem = next(it) if prob.has_neg else None
    z_gmem = next(it) if prob.has_zero else None
    o_gmem = next(it)

    bm, bn, bk, p = cfg.block_m, cfg.block_n, cfg.block_k, prob.slots
    seg = bk // p
    xdt = jnp.dtype(prob.x_dtype)
    j, i = lax.axis_index("n"), lax.axis_index("m")

    def layout(v, lay=plgpu.Layout.WGMMA):
        # The GPU interpreter has no layout_cast rule; layouts only matter for the real lowering.
        return v if interpret else plgpu.layout_cast(v, lay)

    tpg = groups_per_step(prob, bk)
    if tpg > 1:  # slot row r of a step belongs to the step's group r // (group / slots)
        iota = (jax.lax.broadcasted_iota(jnp.int32, (seg, bn), 0) if interpret else
                plgpu.broadcasted_iota(jnp.int32, (seg, bn), 0, layout=plgpu.Layout.WGMMA))
        group_of_row = iota // (prob.group // p)

    def row(ref):
        if ref is None:
            return None
        v = layout(jnp.broadcast_to(ref[0].astype(jnp.float32), (seg, bn)))
        for g in range(1, tpg):  # several groups per step: one select per further group
            v = jnp.where(group_of_row == g, layout(jnp.broadcast_to(ref[g].astype(jnp.float32), (seg, bn))), v)
        return v

    def step(acc_ref, indices, x_smem, *smem):
        (t,) = indices
        smem = iter(smem)
        if prob.bits == 3:
            planes = [next(smem)[...], next(smem)[...], next(smem)[...]]
        else:
            planes = [next(smem)[...]]
        planes = [layout(v).astype(jnp.int32) for v in planes]
        s_ref = next(smem)
        sn_ref = next(smem) if prob.has_neg else None
        z_ref = next(smem) if prob.has_zero else None
        sc = decode.prepare_scales(prob, row(s_ref), row(sn_ref), row(z_ref))
        # Double-buffered weight tile: this step writes buffer t % 2 while the previous step's WGMMA (reading the
        # other one) may still run. wgmma_wait(1) leaves one WGMMA in flight, the one issued here; the one that
        # read this buffer (step t - 2) was retired by step t - 1's wait.
        w_buf = w_smem.at[lax.rem(t, buffers)]
        for s, w in enumerate(decode.dequant_slots(prob, planes, sc)):
            w_buf[pl.ds(s * seg, seg), :] = w.astype(xdt)
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, x_smem, w_buf)
        plgpu.wgmma_wait(buffers - 1)

    def group_row(t):
        return 0 if prob.per_channel else (t * bk) // prob.group

    # With two weight buffers, x's buffer of step t is read by the WGMMA still in flight during step t + 1: it
    # is released one step late.
    x_spec = plgpu.BlockSpec((bm, bk), lambda t: (i, t), transforms=_transforms(bk, xdt.itemsize),
                             delay_release=buffers - 1)
    code_specs, code_args = [], []
    if prob.bits == 3:
        # 2-bit plane through the (R/2, 2N) view of the codes (a free bitcast on GPU): pair-row r holds byte rows
        # 2r (columns [0, N)) and 2r + 1 (columns [N, 2N)), i.e. the even and odd rows the slots need.
        p2, p1 = prob.planes
        nb = prob.n // bn
        code_specs.append(plgpu.BlockSpec((seg, bn), lambda t: (t, j)))
        code_specs.append(plgpu.BlockSpec((seg, bn), lambda t: (t, nb + j)))
        first1 = p1.row_offset // seg
        code_specs.append(plgpu.BlockSpec((seg, bn), lambda t: (first1 + t, j)))
        code_args += [c2_gmem, c2_gmem, c_gmem]
    else:
        code_specs.append(plgpu.BlockSpec((bk // prob.planes[0].rows_per_byte, bn), lambda t: (t, j)))
        code_args.append(c_gmem)
    scale_args = [a for a in (s_gmem, sn_gmem, z_gmem) if a is not None]
    if tpg > 1:  # the step's tpg scale rows: block t of (tpg, bn) blocks
        scale_specs = [plgpu.BlockSpec((tpg, bn), lambda t: (t, j)) for _ in scale_args]
    else:
        scale_specs = [plgpu.BlockSpec((1, bn), lambda t: (group_row(t), j)) for _ in scale_args]

    def compute(acc_ref):
        plgpu.emit_pipeline(functools.partial(step, acc_ref), grid=(tiles,), in_specs=[x_spec, *code_specs, *scale_specs],
                            max_concurrent_steps=stages)(x_gmem, *code_args, *scale_args)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((bm, bn), jnp.float32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
    plgpu.wait_smem_to_gmem(0)


def _tail_matmul(x2d, qt, prob: Problem, k0: int) -> jax.Array:
    """``x[:, k0:] @ W[k0:K]`` in XLA with the op's numerics (weights decoded as `quantizer.dequantize` does,
    rounded to x's dtype, float32 sums): the rows past the kernel's last whole K step when block_k does not
    divide K. ``k0`` is a multiple of block_k (>= 64 rows per byte), so every plane's rows of [k0, Kp) are
    whole packed rows."""
    planes = [qt.codes[pl.row_offset + k0 * pl.width // 8:pl.row_offset + pl.rows] for pl in prob.planes]
    codes = packing.unpack(jnp.concatenate(planes, axis=0), prob.bits, prob.kp - k0)[:prob.k - k0]
    group = (k0 + jnp.arange(prob.k - k0)) // prob.group  # per-channel: the group is all of K
    pos, neg = qt.float_scales()
    params = quantizer.GroupParams(pos[group], None if neg is None else neg[group],
                                   None if qt.zero is None else qt.zero[group])
    w = quantizer.decode(prob.fmt, prob.asym, codes, params).astype(x2d.dtype)
    return jax.lax.dot_general(x2d[:, k0:], w, (((1,), (0,)), ((), ())), precision=dot_precision(x2d.dtype),
                               preferred_element_type=jnp.float32)


def quantized_matmul_mosaic_gpu(x2d, qt, prob: Problem, cfg: BlockConfig, *, interpret: bool = False):
    """The kernel over K's whole steps; a ragged last piece of K (e.g. K = 576 with 128-row steps) is added by
    `_tail_matmul`, the kernel then writing float32 so the sum is rounded to x's dtype once."""
    p, bm, bn, bk = prob.slots, cfg.block_m, cfg.block_n, cfg.block_k
    tiles = prob.kp // bk
    k_main = tiles * bk
    tail = k_main < prob.k
    mp = round_up(max(prob.m, 1), bm)
    xdt = jnp.dtype(prob.x_dtype)
    out_dt = jnp.dtype(jnp.float32) if tail else xdt
    stages = cfg.num_stages or 2
    buffers = weight_buffers(prob, bk, stages)
    xp = base.permute_x(x2d[:, :k_main] if tail else x2d, mp=mp, tiles=tiles, block_k=bk, slots=p,
                        segment=bk // p)
    extra = [a for a in (qt.scale_neg, qt.zero) if a is not None]
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        interp = InterpretGPUParams()
    else:
        interp = None
    call = plgpu.kernel(
        functools.partial(_kernel, prob=prob, cfg=cfg, tiles=tiles, stages=stages, buffers=buffers,
                          interpret=bool(interpret)),
        out_type=jax.ShapeDtypeStruct((mp, prob.n), out_dt),
        grid=(prob.n // bn, mp // bm),
        grid_names=("n", "m"),
        scratch_types=dict(
            w_smem=plgpu.SMEM((buffers, bk, bn), xdt, transforms=_transforms(bn, xdt.itemsize)),
            o_smem=plgpu.SMEM((bm, bn), out_dt, transforms=_transforms(bn, out_dt.itemsize)),
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interp,
    )
    codes = [qt.codes]
    if prob.bits == 3:
        codes.append(qt.codes.reshape(prob.packed_rows // 2, 2 * prob.n))
    y = call(xp, *codes, qt.scale, *extra)[:prob.m]
    return (y + _tail_matmul(x2d, qt, prob, k_main)).astype(xdt) if tail else y


@dataclasses.dataclass(frozen=True)
class MosaicGpu:
    name: str = "mosaic_gpu"
    backend: str = "gpu"

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        return device_refusal() or why_unsupported(prob, config)

    def preferred(self, prob: Problem) -> str | None:
        return base.gpu_why_not_preferred(prob)

    def default_config(self, prob: Problem, config: BlockConfig | None = None) -> BlockConfig:
        return default_config(prob, config)

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        return quantized_matmul_mosaic_gpu(x2d, qt, prob, config, interpret=interpret)
