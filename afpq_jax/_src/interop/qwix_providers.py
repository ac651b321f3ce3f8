"""AFPQ inside qwix: providers that quantize the ``dot_general`` / ``einsum`` weights of any Flax model.

qwix (google's JAX quantization library) intercepts a model's ``jax.lax.dot_general`` / ``jnp.einsum`` /
``jnp.dot`` calls while it runs and hands each one to a provider together with the rule its module path
matches. These providers carry afpq-jax schemes on qwix rules (`AfpqRule`):

- `PtqProvider`: the first call of a matching op with a float parameter as its weight replaces that parameter
  in the module by a `PackedWeight` (our packed `QuantizedTensor` plus the weight's `WeightLayout`); every call
  then runs ``quantized_matmul`` (the fused kernel where the backend has one). `quantize_params` converts a
  float params tree for an abstract PTQ model leaf by leaf (with `GptqCalibration`'s Hessians: GPTQ).
- `QatProvider`: the op runs on ``fake_quant(weight)`` (straight-through gradient), so an existing training
  loop trains the quantization-aware model unchanged.
- `GptqCalibration`: float forwards that accumulate ``H = 2/n sum x x^T`` per matching weight (one pass over
  the whole model, not block by block).

What qwix does not expose publicly and these use is reached through `qwix_compat` only.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from afpq_jax._src.algorithms.gptq import accumulate_hessian, gptq_quantize
from afpq_jax._src.errors import InputError
from afpq_jax._src.interop import qwix_compat as compat
from afpq_jax._src.interop.layout import DotPlan, EinsumPlan, WeightLayout, dot_general_plan, einsum_plan
from afpq_jax._src.kernels.quantized_matmul import quantized_matmul
from afpq_jax._src.kernels.quantized_matmul_a8 import quantized_matmul_a8
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.quantizer import dequantize
from afpq_jax._src.scheme import QuantScheme

@dataclasses.dataclass(frozen=True, kw_only=True)
class AfpqRule(qwix.QuantizationRule):
    """A qwix rule whose matching weights get an afpq-jax `QuantScheme` (``None``: leave them float).

    ``module_path`` is qwix's: a regular expression that must match the whole ``/``-joined module path
    (``layers/0/attn/q_proj``); the first matching rule decides. ``op_names`` restricts it to some ops
    (``dot_general``, ``einsum``). Activation int8 (``scheme.act_bits=8``) is supported in PTQ with
    ``act_mode="dynamic"``. qwix's own ``weight_qtype`` / ``act_qtype`` fields must stay unset.
    """

    scheme: QuantScheme | None = None


def _check_rules(rules: Sequence[qwix.QuantizationRule]) -> list[AfpqRule]:
    if isinstance(rules, qwix.QuantizationRule):
        rules = [rules]
    if rules is None or isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise InputError(f"rules must be a list of afpq_jax.qwix.AfpqRule, got {type(rules).__name__}")
    out = []
    for r in rules:
        if not isinstance(r, AfpqRule):
            kind = "a plain qwix rule" if isinstance(r, qwix.QuantizationRule) else f"a {type(r).__name__}"
            raise InputError(f"rule {r} is {kind}; afpq_jax.qwix providers take "
                             f"afpq_jax.qwix.AfpqRule(module_path=..., scheme=afpq_jax.QuantScheme.create(...))")
        if r.weight_qtype is not None or r.act_qtype is not None:
            raise InputError(f"AfpqRule(module_path={r.module_path!r}) sets qwix's weight_qtype/act_qtype; the "
                             f"scheme decides the weight format (and scheme.act_bits the activations)")
        if r.scheme is not None:
            if not isinstance(r.scheme, QuantScheme):
                raise InputError(f"AfpqRule(module_path={r.module_path!r}).scheme must be an "
                                 f"afpq_jax.QuantScheme, got {type(r.scheme).__name__}")
            r.scheme.validate()
        out.append(r)
    return out


@flax.struct.dataclass
class PackedWeight:
    """A quantized weight in someone else's module: packed ``qt`` (the ``(K, N)`` view, see `WeightLayout`),
    the ``layout`` of the weight it replaced and the ``scheme`` that made it. It stands where the float
    parameter stood (its leaves boxed as ``nnx.Param`` in NNX modules), so ``module.kernel[...]`` and
    ``module.kernel.value`` give it back and the providers recognise it. Invariant: ``qt.shape ==
    (layout.k, layout.n)``."""

    qt: QuantizedTensor
    layout: WeightLayout = flax.struct.field(pytree_node=False)
    scheme: QuantScheme = flax.struct.field(pytree_node=False)

    value = property(lambda self: compat.unbox(self))
    shape = property(lambda self: self.layout.shape)
    ndim = property(lambda self: len(self.layout.shape))
    dtype = property(lambda self: jnp.dtype(self.qt.dtype))

    def __getitem__(self, key):
        if key is not Ellipsis and key != ():
            raise TypeError("a PackedWeight can only be read whole (weight[...])")
        return self.value

    def astype(self, dtype) -> PackedWeight:  # the matmul casts; the packed codes stay as they are
        return self

    def reshape(self, *shape) -> PackedWeight:
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)
        if shape != self.layout.shape:
            raise InputError(f"a quantized weight of shape {self.layout.shape} cannot be reshaped to {shape} "
                             f"(quantize the layer in the shape its matmul uses)")
        return self

    def validate(self) -> None:
        self.qt.validate()
        if tuple(self.qt.shape) != (self.layout.k, self.layout.n):
            raise ValueError(f"packed shape {self.qt.shape} is not the layout's ({self.layout.k}, {self.layout.n})")

    def dequantize(self) -> jax.Array:
        """The float weight in its original shape."""
        return self.layout.from_2d(dequantize(self.qt))


nnx.register_data_type(PackedWeight)


def _layer_name() -> str:
    return "/".join(map(str, compat.current_module_path())) or type(compat.current_module()).__name__


def _stored_param(module: nnx.Module, name: str, w) -> jax.Array:
    """The NNX parameter ``name`` as stored, checked to be what the op received as ``w`` (up to a dtype cast).

    An op whose weight is the parameter transformed (``w.T``, ``w * c``) is refused: packing the parameter would
    change what the model computes. So is an op traced inside a jitted library function (``x @ w`` runs
    jnp.matmul's own jit): what runs there is cached by that function for every later call of the same shapes,
    quantized or not, so nothing may be substituted inside it."""
    value = getattr(module, name).get_value()
    where = _layer_name()
    if isinstance(w, jax.core.Tracer) and (not isinstance(value, jax.core.Tracer) or w._trace is not value._trace):
        raise InputError(f"{where}: its weight {name} reaches dot_general inside another jitted function (as "
                         f"`x @ w` does through jnp.matmul); write jnp.dot(x, w), jnp.einsum or "
                         f"jax.lax.dot_general, or use nnx.Linear / nnx.Einsum")
    if tuple(value.shape) != tuple(w.shape) or not (
            isinstance(w, jax.core.Tracer) or w is value
            or np.array_equal(np.asarray(w), np.asarray(value).astype(w.dtype))):
        raise InputError(f"{where}: the op's weight operand is {name} transformed (e.g. w.T or w * c), not {name} "
                         f"as stored; write the op on the parameter itself, or keep this layer float with a rule "
                         f"whose scheme is None")
    return value


def _has_matrix_params(module) -> bool:
    if isinstance(module, nn.Module):
        params = module.variables.get("params", {}) if module.scope is not None else {}
        return any(jnp.ndim(compat.unbox(v)) >= 2 for v in params.values() if not isinstance(v, Mapping))
    return any(isinstance(v, nnx.Param) and v.ndim >= 2 for v in vars(module).values())


class _AfpqProvider(qwix.QuantizationProvider):
    """What the three providers share: rule lookup, op interception, plan building, unused-rule warnings.
    Subclasses implement `_run(plan, x, w, scheme, original)` for a matching op whose weight is ``w``."""

    def __init__(self, rules: Sequence[AfpqRule], *, disable_jit: bool = False):
        super().__init__(_check_rules(rules), disable_jit=disable_jit)
        self._quantized: set[str] = set()  # layers whose weight an op quantized
        self._missed: set[str] = set()     # layers with matrix parameters where a matching op saw no parameter

    # ---- what qwix calls ----
    def get_intercept_map(self):
        return super().get_intercept_map() | {
            "jax.lax.dot_general": self.dot_general,
            "jax.numpy.einsum": self.einsum,
            "jax.numpy.dot": self.dot,
            "jax.numpy.matmul": self.matmul,
            "flax.linen.Module.param": self._linen_param,
            "flax.linen.dtypes.promote_dtype": self._promote_dtype,
            "flax.nnx.nn.dtypes.promote_dtype": self._promote_dtype,
        }

    def process_model_output(self, method_name: str, model_output: Any) -> Any:
        first = not self._initial_run_complete
        model_output = super().process_model_output(method_name, model_output)
        if first:
            for layer in sorted(self._missed - self._quantized):
                warnings.warn(f"{layer}: a rule matches this layer but none of its matmuls took one of its "
                              f"parameters as the weight operand (the weight is transformed first, or the op is "
                              f"not a dot_general/einsum/dot/matmul): it stays float", stacklevel=2)
            for rule in self.get_unused_rules():
                warnings.warn(f"rule module_path={rule.module_path!r} matched no dot_general/einsum of the model; "
                              f"check the pattern against the module paths (e.g. 'layers/0/attn/q_proj')",
                              stacklevel=2)
        return model_output

    # ---- interception ----
    def _scheme(self, op_name: str) -> QuantScheme | None:
        rule = compat.current_rule(self, op_name)
        return rule.scheme if isinstance(rule, AfpqRule) else None

    def _weight(self, w) -> bool:
        """Whether ``w`` is a weight (packed, or a parameter of the running module); notes the misses."""
        found = isinstance(w, PackedWeight) or (hasattr(w, "shape") and compat.find_param(w) is not None)
        layer = _layer_name()
        if found:
            self._quantized.add(layer)
        elif _has_matrix_params(compat.current_module()):
            self._missed.add(layer)
        return found

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                    out_sharding=None):
        def original(x, w):
            return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type, out_sharding=out_sharding)
        scheme = self._scheme("dot_general")
        if scheme is None or not self._weight(rhs):
            return original(lhs, rhs)
        plan = dot_general_plan(jnp.ndim(lhs), tuple(rhs.shape), dimension_numbers, _layer_name())
        return self._typed(self._run(plan, lhs, rhs, scheme, original), preferred_element_type)

    def einsum(self, spec, *operands, precision=None, preferred_element_type=None,
               _dot_general=jax.lax.dot_general, out_sharding=None):
        def original(x, w):
            return jnp.einsum(spec, x, w, precision=precision, preferred_element_type=preferred_element_type,
                              _dot_general=_dot_general, out_sharding=out_sharding)
        scheme = self._scheme("einsum")
        if scheme is None or len(operands) != 2 or not isinstance(spec, str) or not self._weight(operands[1]):
            return jnp.einsum(spec, *operands, precision=precision, preferred_element_type=preferred_element_type,
                              _dot_general=_dot_general, out_sharding=out_sharding)
        x, w = operands
        plan = einsum_plan(spec, tuple(jnp.shape(x)), tuple(w.shape), _layer_name())
        return self._typed(self._run(plan, x, w, scheme, original), preferred_element_type)

    def dot(self, a, b, precision=None, preferred_element_type=None, out_sharding=None):
        if jnp.ndim(a) == 0 or len(getattr(b, "shape", ())) < 2:
            return jnp.dot(a, b, precision=precision, preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)
        dims = (((jnp.ndim(a) - 1,), (len(b.shape) - 2,)), ((), ()))
        return self.dot_general(a, b, dims, precision, preferred_element_type, out_sharding=out_sharding)

    def matmul(self, a, b, precision=None, preferred_element_type=None, out_sharding=None):
        if jnp.ndim(a) == 0 or len(getattr(b, "shape", ())) != 2:
            return jnp.matmul(a, b, precision=precision, preferred_element_type=preferred_element_type,
                              out_sharding=out_sharding)
        return self.dot(a, b, precision, preferred_element_type, out_sharding=out_sharding)

    @staticmethod
    def _typed(y, preferred_element_type):
        return y if preferred_element_type is None else y.astype(preferred_element_type)

    def _linen_param(self, module: nn.Module, name: str, *args, **kwargs):
        existing = module.get_variable("params", name)
        if isinstance(existing, PackedWeight):  # a quantized model's params: no shape check against init
            return existing
        return module.param(name, *args, **kwargs)

    @staticmethod
    def _promote_dtype(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], Sequence):  # nnx's form: one sequence
            args = args[0]
        arrays = [None if isinstance(a, PackedWeight) else a for a in args]
        promoted = flax.linen.dtypes.promote_dtype(*arrays, **kwargs)
        return [a if p is None and a is not None else p for a, p in zip(args, promoted)]

    def _run(self, plan: DotPlan | EinsumPlan, x, w, scheme: QuantScheme, original):
        raise NotImplementedError


def _dot(plan: DotPlan | EinsumPlan) -> DotPlan:
    return plan.dot if isinstance(plan, EinsumPlan) else plan


# Compiled once per scheme / shape: qwix runs models eagerly while it quantizes them, op by op.
@functools.partial(jax.jit, static_argnums=0)
def _rtn(scheme: QuantScheme, w2: jax.Array) -> QuantizedTensor:
    return scheme.quantize(w2)


@functools.partial(jax.jit, static_argnames=("implementation", "int8_activations"))
def _matmul(x2: jax.Array, qt: QuantizedTensor, *, implementation: str | None, int8_activations: bool):
    if int8_activations:
        return quantized_matmul_a8(x2, qt, None).astype(x2.dtype)
    return quantized_matmul(x2, qt, implementation=implementation)


def pack(w: jax.Array, layout: WeightLayout, scheme: QuantScheme, *, hessian: jax.Array | None = None,
         name: str = "kernel", **gptq_options) -> PackedWeight:
    """Quantizes a float weight of ``layout.shape`` (RTN, or GPTQ given the Hessian of its K inputs)."""
    w2 = layout.to_2d(jnp.asarray(w))
    if hessian is None:
        qt = _rtn(scheme, w2)
    else:
        qt = gptq_quantize(w2, hessian, scheme.format, group_size=scheme.group_size, asym=scheme.asym,
                           scale_dtype=scheme.scale_dtype, integer_scales=scheme.integer_scales, name=name,
                           **gptq_options)
    return PackedWeight(qt, layout, scheme)


class PtqProvider(_AfpqProvider):
    """Post-training quantization: matching weights become `PackedWeight`s, matmuls run on packed codes.

    ``qwix.quantize_model(model, PtqProvider(rules), *inputs)`` (NNX) quantizes the model's float weights
    (round to nearest, each rule's scheme) during its first call; for a Linen model, ``init`` of the
    returned module creates packed params and ``apply`` uses them. ``implementation`` picks the matmul
    backend (None: dispatch, see `afpq_jax.kernels`).
    """

    def __init__(self, rules: Sequence[AfpqRule], *, implementation: str | None = None,
                 disable_jit: bool = False):
        super().__init__(rules, disable_jit=disable_jit)
        self.implementation = implementation
        for r in compat.provider_rules(self):
            s = r.scheme
            if s is not None and s.act_bits is not None and s.act_mode != "dynamic":
                raise InputError(f"AfpqRule(module_path={r.module_path!r}): int8 activations through qwix are "
                                 f"per-token dynamic only (act_mode='dynamic'), got {s.act_mode!r}")

    def _run(self, plan, x, w, scheme, original):
        dot = _dot(plan)
        if isinstance(w, PackedWeight):
            if w.layout != dot.layout:
                raise InputError(f"{_layer_name()}: the quantized weight was made for layout {w.layout}, this "
                                 f"op needs {dot.layout}")
            packed = w
        else:
            packed = self._pack_param(w, dot.layout, scheme)
        y2 = _matmul(dot.lhs_2d(jnp.asarray(x)), packed.qt, implementation=self.implementation,
                     int8_activations=packed.scheme.act_bits is not None)
        return plan.output(y2)

    def _pack_param(self, w, layout: WeightLayout, scheme: QuantScheme) -> PackedWeight:
        """Packs the module parameter that ``w`` is and puts the packed weight in its place."""
        name = compat.find_param(w)
        module = compat.current_module()
        if isinstance(module, nn.Module):
            if not module.is_initializing():
                raise InputError(f"{_layer_name()}: a float weight reached a quantized linen model's apply; pass "
                                 f"the params of the PTQ model's init (or afpq_jax.qwix.quantize_params' result)")
            packed = pack(w, layout, scheme, name=f"{_layer_name()}/{name}")
            module.put_variable("params", name, packed)
            return packed
        value = _stored_param(module, name, w)
        packed = pack(value, layout, scheme, name=f"{_layer_name()}/{name}")
        setattr(module, name, jax.tree.map(nnx.Param, packed))
        return packed


class QatProvider(_AfpqProvider):
    """Quantization-aware training: each matching op runs on ``fake_quant(weight)`` with the rule's scheme
    (straight-through gradient to the float weight); nothing in the model changes. Train as usual, then
    quantize the trained weights with `PtqProvider` / `quantize_params`."""

    def __init__(self, rules: Sequence[AfpqRule], *, disable_jit: bool = False):
        super().__init__(rules, disable_jit=disable_jit)
        for r in compat.provider_rules(self):
            if r.scheme is not None and r.scheme.act_bits is not None:
                raise InputError(f"AfpqRule(module_path={r.module_path!r}): QAT through qwix trains weights "
                                 f"only; drop act_bits here and add it to the PTQ rules")

    def _run(self, plan, x, w, scheme, original):
        if isinstance(w, PackedWeight):
            raise InputError(f"{_layer_name()}: QAT needs the float weights; this model is already quantized")
        module = compat.current_module()
        if isinstance(module, nnx.Module):
            _stored_param(module, compat.find_param(w), w)
        layout = _dot(plan).layout
        return original(x, layout.from_2d(scheme.fake_quant(layout.to_2d(w))))


class GptqCalibration(_AfpqProvider):
    """Float forwards that accumulate GPTQ's Hessian ``H = 2/n sum x x^T`` of every matching weight's inputs.

    Run ``cal = qwix.quantize_model(model, provider, *inputs)``, then call ``cal(batch)`` eagerly (not under
    ``jit``) for each calibration batch; `hessians` maps each weight's params path to its Hessian, for
    `quantize_params`. One pass over the whole float model: every layer sees float inputs, unlike the built-in
    models' block-sequential GPTQ where each block sees the already-quantized blocks' outputs.
    """

    def __init__(self, rules: Sequence[AfpqRule], *, disable_jit: bool = False):
        super().__init__(rules, disable_jit=disable_jit)
        self._sums: dict[tuple, tuple[jax.Array, int]] = {}

    def _run(self, plan, x, w, scheme, original):
        if isinstance(w, PackedWeight):
            raise InputError(f"{_layer_name()}: GPTQ calibration needs the float model")
        name = compat.find_param(w)
        module = compat.current_module()
        if isinstance(module, nnx.Module):
            _stored_param(module, name, w)
        if not compat.initializing():  # qwix's own first (initializing) call is not a batch
            x2 = _dot(plan).lhs_2d(jnp.asarray(x))
            if isinstance(x2, jax.core.Tracer):
                raise InputError("GPTQ calibration forwards must run eagerly: call the model outside jax.jit / "
                                 "nnx.jit")
            key = (*compat.current_module_path(), name)
            h, n = self._sums.get(key, (None, 0))
            self._sums[key] = accumulate_hessian(h, x2, n)
        return original(x, w)

    @property
    def hessians(self) -> dict[tuple, jax.Array]:
        """Params path (e.g. ``('layers', 0, 'attn', 'q_proj', 'kernel')``) -> Hessian (K, K), float32."""
        return {k: h for k, (h, _) in self._sums.items()}

    def tokens_seen(self) -> dict[tuple, int]:
        return {k: n for k, (_, n) in self._sums.items()}


def _flatten(tree) -> dict[tuple, Any]:
    return flax.traverse_util.flatten_dict(tree)


def quantize_params(params: Mapping, abstract_quantized_model: Any, *,
                    hessians: Mapping[tuple, jax.Array] | None = None, progress: bool = False,
                    **gptq_options) -> dict:
    """Quantizes a float params tree for a PTQ model, one weight at a time (no second float copy).

    ``params``: the float params as a pure nested dict (NNX: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``;
    Linen: the unboxed ``params`` collection); its leaves may be numpy arrays or lazily read arrays.
    ``abstract_quantized_model``: the PTQ model, typically abstract (NNX: ``nnx.eval_shape(lambda:
    qwix.quantize_model(Model(...), PtqProvider(rules), *inputs))``; Linen: ``jax.eval_shape`` of the PTQ
    module's ``init``, its ``params``); it says which leaves are quantized, in which layout and scheme.
    ``hessians`` (from `GptqCalibration`) switch those weights to GPTQ (``gptq_options``: ``damp``,
    ``block_size``, ``act_order``); the others are rounded to nearest. Returns the tree to ``nnx.update`` the
    abstract model with (NNX) or the ``params`` to ``apply`` (Linen).
    """
    hessians = dict(hessians or {})
    flat = _flatten(params)
    out: dict[tuple, Any] = {}
    items = list(flat.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="quantize", unit="tensor")
    for path, w in items:
        target = compat.value_at(abstract_quantized_model, path)
        if target is None:
            raise InputError(f"params path {'/'.join(map(str, path))} is not in the quantized model; pass the "
                             f"params of the same model class and configuration")
        target = compat.unbox(target)
        if isinstance(target, PackedWeight):
            if tuple(np.shape(w)) != target.layout.shape:
                raise InputError(f"{'/'.join(map(str, path))}: float weight shape {tuple(np.shape(w))} is not the "
                                 f"quantized model's {target.layout.shape}")
            out[path] = pack(w, target.layout, target.scheme, hessian=hessians.pop(path, None),
                             name="/".join(map(str, path)), **gptq_options)
        else:
            out[path] = jnp.asarray(w)
    if hessians:
        raise InputError(f"Hessians for weights that are not quantized: {sorted(hessians)[:3]}; calibrate with the "
                         f"same rules as the PTQ model")
    tree = flax.traverse_util.unflatten_dict(out)
    if isinstance(abstract_quantized_model, nnx.Module):
        return nnx.to_pure_dict(nnx.state(tree))
    return tree


def packed_weights(tree: Any) -> dict[str, PackedWeight]:
    """Every `PackedWeight` of an NNX model or a (Linen) params tree, by its ``/``-joined path."""
    if isinstance(tree, nnx.Module):
        return {"/".join(map(str, (*path, name))): v for path, module in nnx.iter_modules(tree)
                for name, v in vars(module).items() if isinstance(v, PackedWeight)}
    leaves = jax.tree_util.tree_flatten_with_path(compat.unbox(tree),
                                                  is_leaf=lambda x: isinstance(x, PackedWeight))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
            for path, v in leaves if isinstance(v, PackedWeight)}
