"""How a weight operand of a ``dot_general`` / ``einsum`` maps onto the 2-D kernel the quantizer groups.

The quantizer and the kernels take a weight ``(K, N)`` (Flax kernel layout): groups run along K, the
contraction axis. A weight in someone else's model can have several contracting axes (an attention output
projection ``'BTNH,NHD->BTD'`` contracts N and H) and several kept axes (``'BTD,DNH->BTNH'`` keeps N and H).
`WeightLayout` fixes the 2-D view: the contracting axes, in the weight's own axis order, flattened row-major
into K; the kept axes, in order, flattened into N. So an ``nnx.Einsum`` kernel ``(D, N, H)`` has the same 2-D
view as an ``nnx.Linear`` kernel ``(D, N*H)`` holding the same numbers, and an ``(N, H, D)`` one the same as
``(N*H, D)`` — groups of an o_proj span heads exactly as in the built-in models.

Weights with batch axes (shared with the activation and kept in the output, as in a mixture of experts) and
weight axes summed on their own are declined with an `InputError` naming the layer. Pure shape logic: no qwix,
no Flax.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import InputError


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """A weight of ``shape`` seen as ``(K, N)``: K = the ``contracting`` axes (ascending) flattened row-major,
    N = the other axes (ascending) flattened row-major. Invariant: ``contracting`` and ``kept`` partition
    ``range(len(shape))`` and both are sorted; ``contracting`` is not empty."""

    shape: tuple[int, ...]
    contracting: tuple[int, ...]

    def __post_init__(self):
        axes = tuple(sorted(set(self.contracting)))
        if not axes or axes != tuple(self.contracting) or axes[0] < 0 or axes[-1] >= len(self.shape):
            raise ValueError(f"contracting axes {self.contracting} are not sorted distinct axes of {self.shape}")

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.contracting)

    @property
    def k(self) -> int:
        return math.prod(self.shape[a] for a in self.contracting)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.kept)

    def to_2d(self, w: jax.Array) -> jax.Array:
        """The ``(K, N)`` view of a weight of `shape`."""
        if tuple(w.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(w.shape)} is not the layout's {self.shape}")
        return jnp.transpose(w, self.contracting + self.kept).reshape(self.k, self.n)

    def from_2d(self, w2: jax.Array) -> jax.Array:
        """Inverse of `to_2d`."""
        order = self.contracting + self.kept
        w = w2.reshape(tuple(self.shape[a] for a in order))
        return jnp.transpose(w, tuple(order.index(a) for a in range(len(self.shape))))


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """``dot_general(x, w, ...)`` as ``x2 @ W2`` with ``W2 = layout.to_2d(w)``: ``x2`` is x transposed to
    ``x_kept + x_contracting`` (x's contracting axes paired with the layout's K order) and reshaped to
    ``(..., K)``; the result ``(..., N)`` reshaped to ``x_kept shape + layout.kept shape`` is dot_general's."""

    layout: WeightLayout
    x_contracting: tuple[int, ...]  # x's axis paired with each of layout.contracting, in that order

    def lhs_2d(self, x: jax.Array) -> jax.Array:
        kept = tuple(a for a in range(x.ndim) if a not in self.x_contracting)
        x = jnp.transpose(x, kept + self.x_contracting)
        return x.reshape(x.shape[:len(kept)] + (self.layout.k,))

    def output(self, y2: jax.Array) -> jax.Array:
        return y2.reshape(y2.shape[:-1] + tuple(self.layout.shape[a] for a in self.layout.kept))


def dot_general_plan(x_ndim: int, w_shape: tuple[int, ...], dimension_numbers, name: str) -> DotPlan:
    """The `DotPlan` of ``lax.dot_general(x, w, dimension_numbers)``; `InputError` for a weight with batch axes."""
    (x_c, w_c), (x_b, w_b) = dimension_numbers
    x_c, w_c = tuple(int(a) % x_ndim for a in x_c), tuple(int(a) % len(w_shape) for a in w_c)
    if x_b or w_b:
        raise InputError(f"{name}: the weight has batch axes {tuple(w_b)} in its dot_general (e.g. one matrix "
                         f"per expert); afpq-jax quantizes 2-D contractions only: leave this layer float with "
                         f"a rule whose scheme is None")
    if not w_c:
        raise InputError(f"{name}: the dot_general contracts no axis of the weight (an outer product); leave "
                         f"this layer float with a rule whose scheme is None")
    pairs = sorted(zip(w_c, x_c))
    return DotPlan(WeightLayout(tuple(int(d) for d in w_shape), tuple(p[0] for p in pairs)),
                   tuple(p[1] for p in pairs))


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """A two-operand einsum ``x, w -> out`` as a `DotPlan` followed by a transpose to ``out``."""

    dot: DotPlan
    result_spec: str  # labels of dot's output: x's kept labels, then w's kept labels
    out_spec: str

    def output(self, y2: jax.Array) -> jax.Array:
        y = self.dot.output(y2)
        return y if self.result_spec == self.out_spec else jnp.einsum(f"{self.result_spec}->{self.out_spec}", y)


def einsum_plan(spec: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], name: str) -> EinsumPlan:
    """The `EinsumPlan` of ``jnp.einsum(spec, x, w)``; `InputError` naming ``name`` for what it cannot map
    (more than two operands, an ellipsis on the weight, weight axes kept as batch axes or summed alone)."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise InputError(f"{name}: einsum {spec!r} is not of the form 'x,w->out' with two operands; leave this "
                         f"layer float with a rule whose scheme is None")
    ins, out = spec.split("->")
    x_spec, w_spec = ins.split(",")
    if "..." in w_spec:
        raise InputError(f"{name}: einsum {spec!r} has an ellipsis on the weight operand; spell the weight's "
                         f"axes out, or leave this layer float")
    if "..." in x_spec:  # the ellipsis stands for x's leading axes: give them fresh labels
        free = [c for c in string.ascii_letters if c not in spec]
        n_ell = len(x_shape) - (len(x_spec) - 3)
        fill = "".join(free[:n_ell])
        x_spec, out = x_spec.replace("...", fill), out.replace("...", fill)
    if len(x_spec) != len(x_shape) or len(w_spec) != len(w_shape):
        raise InputError(f"{name}: einsum {spec!r} does not match operand shapes {tuple(x_shape)}, "
                         f"{tuple(w_shape)}")
    contracted = [c for c in w_spec if c in x_spec and c not in out]
    batch = [c for c in w_spec if c in x_spec and c in out]
    alone = [c for c in w_spec if c not in x_spec and c not in out]
    if batch:
        raise InputError(f"{name}: einsum {spec!r} keeps weight axes {''.join(batch)!r} as batch axes (one "
                         f"matrix per entry); afpq-jax quantizes 2-D contractions only: leave this layer float "
                         f"with a rule whose scheme is None")
    if alone or not contracted:
        raise InputError(f"{name}: einsum {spec!r} sums weight axes on their own or contracts none; leave this "
                         f"layer float with a rule whose scheme is None")
    if any(c not in out and c not in w_spec for c in x_spec):
        raise InputError(f"{name}: einsum {spec!r} sums activation axes on their own; not supported for a "
                         f"quantized weight")
    dims = (tuple(x_spec.index(c) for c in contracted), tuple(w_spec.index(c) for c in contracted))
    dot = dot_general_plan(len(x_shape), tuple(w_shape), (dims, ((), ())), name)
    result = "".join(c for c in x_spec if c not in contracted) + "".join(w_spec[a] for a in dot.layout.kept)
    return EinsumPlan(dot, result, out)
