"""Flax NNX layers: `QuantDense` (float or packed low-bit weight) and the norms the model families share."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src import formats as formats_lib
from afpq_jax._src import packing
from afpq_jax._src import quantizer
from afpq_jax._src.kernels.quantized_matmul import quantized_matmul
from afpq_jax._src.kernels.quantized_matmul_a8 import quantized_matmul_a8
from afpq_jax._src.qtensor import GLOBAL_SCALED, LEAF_NAMES, QuantizedTensor
from afpq_jax._src.scheme import QuantScheme


_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("afpq_recorder", default=None)


@contextlib.contextmanager
def record_inputs():
    """Collects ``(layer, input)`` for every `QuantDense` call inside the block (calibration taps).

    Works under tracing too: the recorded inputs are then tracers of the enclosing jitted function, and layers
    fed the same array (q/k/v) record the same object, so callers can share work per distinct input.
    """
    taps: list = []
    token = _RECORDER.set(taps)
    try:
        yield taps
    finally:
        _RECORDER.reset(token)


class QuantWeight(nnx.Variable):
    """Packed codes / scales of a quantized kernel, or a calibrated activation scale: state, but not a
    trainable `nnx.Param`."""


def abstract_quantized(shape: tuple[int, ...], scheme: QuantScheme, dtype) -> QuantizedTensor:
    """Zero-filled `QuantizedTensor` with the structure `quantize` would produce (for eval_shape / restore)."""
    fmt = formats_lib.get_format(scheme.format)
    k, n = shape[-2:]
    g = k if scheme.group_size is None else min(scheme.group_size, k)
    groups = -(-k // g)
    lead = tuple(shape[:-2])
    sdt = jnp.dtype(scheme.scale_dtype)
    gdt = jnp.uint8 if scheme.integer_scales else sdt  # integer group scales: uint8 times a channel scale
    return QuantizedTensor(
        codes=jnp.zeros((*lead, packing.packed_rows(k, fmt.bits), n), jnp.uint8),
        scale=jnp.zeros((*lead, groups, n), gdt),
        scale_neg=jnp.zeros((*lead, groups, n), gdt) if scheme.asym and not fmt.is_int else None,
        zero=jnp.zeros((*lead, groups, n), jnp.uint8) if scheme.asym and fmt.is_int else None,
        channel_scale=jnp.zeros((*lead, n), sdt) if scheme.integer_scales else None,
        global_scale=jnp.ones((*lead, 1), jnp.float32) if sdt.name in GLOBAL_SCALED else None,
        format_name=fmt.name, group_size=scheme.group_size, asym=scheme.asym, shape=tuple(shape),
        dtype=jnp.dtype(dtype).name)


class QuantDense(nnx.Module):
    """``y = x @ W (+ b)`` with ``W`` either a float `kernel` (in, out) or a packed `QuantizedTensor`.

    The quantized weight is held as `QuantWeight` variables (``codes``, ``scale``, ``scale_neg``, ``zero``,
    ``channel_scale``: `QuantizedTensor`'s leaves, absent ones None) with
    its static description (scheme, shape, dtype) as plain attributes, so `nnx.split` puts only arrays in the
    state and the graphdef carries the rest. A scheme with int8 activations (``act_bits=8``) runs the integer
    path (`quantized_matmul_a8`); ``act_mode="static"`` adds ``input_scale``, the calibrated per-tensor scale.
    A scheme with ``act_order_groups`` (an imported GPTQ ``desc_act`` layer) adds ``input_perm``, int32 ``(in,)``:
    stored weight row ``j`` is input row ``input_perm[j]``, so the layer computes ``x[..., input_perm] @ W``.

    Quantization-aware training: `enable_fake_quant` keeps the float ``kernel`` as the latent (trainable) weight
    and runs the forward through ``fake_quant`` with ``train_scheme`` (straight-through gradient); `quantize`
    with that scheme then packs exactly the weight the forward used.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, dtype=jnp.float32,
                 scheme: QuantScheme | None = None, rngs: nnx.Rngs | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = jnp.dtype(dtype).name
        self.scheme = scheme
        self.train_scheme = None
        if scheme is None:
            rngs = rngs or nnx.Rngs(0)
            init = nnx.initializers.lecun_normal()
            self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        else:
            self._set_quantized(abstract_quantized((in_features, out_features), scheme, dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    # -- weight access ---------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.scheme is not None

    def quantized_tensor(self) -> QuantizedTensor:
        s = self.scheme
        leaves = {name: None if getattr(self, name) is None else getattr(self, name).get_value()
                  for name in LEAF_NAMES}
        return QuantizedTensor(
            **leaves, format_name=s.format, group_size=s.group_size, asym=s.asym,
            shape=(self.in_features, self.out_features), dtype=self.dtype)

    def weight(self) -> jax.Array:
        """The effective float kernel (dequantized if quantized; rows in the input's order)."""
        if not self.is_quantized:
            return self.kernel.get_value()
        w = quantizer.dequantize(self.quantized_tensor())
        if self.input_perm is not None:  # stored row j is input row perm[j]
            w = w[jnp.argsort(self.input_perm.get_value())]
        return w

    def _set_quantized(self, qt: QuantizedTensor) -> None:
        for name in LEAF_NAMES:
            leaf = getattr(qt, name)
            setattr(self, name, None if leaf is None else QuantWeight(leaf))
        static = self.scheme is not None and self.scheme.act_mode == "static"
        self.input_scale = QuantWeight(jnp.ones((), jnp.float32)) if static else None
        ordered = self.scheme is not None and self.scheme.act_order_groups
        self.input_perm = QuantWeight(jnp.arange(self.in_features, dtype=jnp.int32)) if ordered else None

    def set_activation_quant(self, act_bits: int | None, act_mode: str | None,
                             input_scale: float | jax.Array | None = None) -> None:
        """Sets how this (quantized) layer's input is quantized: (None, None) float, (8, "dynamic") per-token
        int8, (8, "static") per-tensor int8 with the calibrated scale ``input_scale`` (> 0)."""
        if not self.is_quantized:
            raise InputError("activation quantization needs a quantized weight (integer path); quantize first")
        if act_mode == "static" and (input_scale is None or not float(input_scale) > 0):
            raise InputError(f"a static activation scheme needs a positive input_scale, got {input_scale!r}")
        self.scheme = self.scheme.with_activations(act_bits, act_mode)
        if hasattr(self, "input_scale"):  # NNX fixes an attribute's data/static status at first assignment
            del self.input_scale
        self.input_scale = (QuantWeight(jnp.asarray(input_scale, jnp.float32).reshape(()))
                            if act_mode == "static" else None)

    def enable_fake_quant(self, scheme: QuantScheme | None) -> None:
        """Trains this float layer quantization-aware with ``scheme`` (weights only; None: plain float again)."""
        if self.is_quantized:
            raise InputError("fake quantization needs the float kernel; this layer is already packed")
        if scheme is not None:
            if scheme.quantizes_activations:
                raise InputError("quantization-aware training here fakes weight quantization only; drop act_bits")
            scheme.validate()
        self.train_scheme = scheme

    def set_quantized(self, qt: QuantizedTensor) -> None:
        """Replaces the kernel by a packed weight (drops the float kernel)."""
        if qt.shape != (self.in_features, self.out_features):
            raise InputError(f"quantized weight shape {qt.shape} does not match layer "
                             f"({self.in_features}, {self.out_features})")
        qt.validate()
        if getattr(self, "input_perm", None) is not None:
            raise InputError("this layer's input is permuted (act-order groups); it cannot take another weight")
        if hasattr(self, "kernel"):
            del self.kernel
        self.train_scheme = None
        self.scheme = QuantScheme.create(qt.format_name, group_size=qt.group_size, asym=qt.asym,
                                         scale_dtype=qt.scale_dtype,
                                         integer_scales=qt.integer_scales)  # activations: float
        self._set_quantized(qt)

    def quantize(self, scheme: QuantScheme, clip_ratios=None, global_scale=None) -> QuantizedTensor:
        """Round-to-nearest quantization of this layer's float kernel, in place (``clip_ratios`` from the
        clipping search shrink each group's range first; ``global_scale``: E4M3 scales under a given global
        scale, `QuantScheme.global_scale`). A scheme with dynamic int8 activations sets them too.
        Static ones need the calibrated scale, which this call does not have: the weights are quantized and the
        input stays float until `set_activation_quant(8, "static", scale)` (the calibration driver's step)."""
        if self.is_quantized:
            raise InputError("layer is already quantized")
        if not isinstance(scheme, QuantScheme):
            raise ArgumentTypeError(f"QuantDense.quantize takes a QuantScheme (aq.QuantScheme.create(...)), got "
                                    f"{type(scheme).__name__}")
        qt = scheme.quantize(self.kernel.get_value(), clip_ratios, global_scale)
        self.set_quantized(qt)
        if scheme.act_mode == "dynamic":
            self.set_activation_quant(scheme.act_bits, scheme.act_mode)
        return qt

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise InputError(f"x's last axis ({x.shape[-1]}) must equal the layer's in_features ({self.in_features})")
        taps = _RECORDER.get()
        if taps is not None:
            taps.append((self, x))
        if self.is_quantized and self.input_perm is not None:  # act-order groups: rows stored permuted
            x = jnp.take(x, self.input_perm.get_value(), axis=-1)
        if self.is_quantized and self.scheme.quantizes_activations:
            scale = None if self.input_scale is None else self.input_scale.get_value()
            y = quantized_matmul_a8(x, self.quantized_tensor(), scale)
        elif self.is_quantized:
            # the fused kernel for this backend (Mosaic TPU, Triton / Mosaic GPU, the C++ kernel on CPU at decode
            # sizes), else dequantize-then-dot
            y = quantized_matmul(x, self.quantized_tensor())
        elif self.train_scheme is not None:
            y = jnp.matmul(x, self.train_scheme.fake_quant(self.kernel.get_value()).astype(x.dtype))
        else:
            y = jnp.matmul(x, self.kernel.get_value().astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, statistics in float32, in either of HF's two orders:

    * ``plus_one=False`` (LLaMA, Qwen): ``weight * normalized.astype(x.dtype)``, weight initialised to 1;
    * ``plus_one=True`` (Gemma): ``(normalized * (1 + weight)).astype(x.dtype)``, all in float32, weight
      initialised to 0. `gain` is the multiplier either way (folds divide it, not the raw weight).
    """

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, plus_one: bool = False):
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), dtype))

    @property
    def offset(self) -> float:
        """What the weight is stored minus: the gain is ``offset + weight``."""
        return 1.0 if self.plus_one else 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(x.dtype)
        return self.weight.get_value() * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32 (BLOOM)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight.get_value() + self.bias.get_value()).astype(x.dtype)
