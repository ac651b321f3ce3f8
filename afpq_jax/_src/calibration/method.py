"""The method protocol and registry: how a quantization method plugs into the block-by-block driver.

A method says which statistics it needs from the taps on a block's linear-layer inputs (`Method.statistics`), and
turns one float block into a quantized one (`Method.quantize_block`), given a `BlockContext`: the block, each
layer's own scheme, the accumulated statistics, and on-demand access to layer inputs for searches. The driver
(`calibration.driver`) only iterates blocks and hands each method its context; a new method is a `Method`
subclass registered with `register_method`, with no edit to the driver.

Methods are frozen dataclasses: their fields are the method's options, recorded in quantization_config.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from afpq_jax._src.calibration import taps
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.taps import Statistic
from afpq_jax._src.calibration.timer import PhaseTimer
from afpq_jax._src.errors import InputError
from afpq_jax._src.layers import QuantDense
from afpq_jax._src.models import ModelConfig
from afpq_jax._src.models.transformer import FUSED_SIBLINGS, Block, block_linears
from afpq_jax._src.scheme import QuantScheme


@dataclasses.dataclass
class BlockContext:
    """What a method sees of one decoder block.

    ``block`` is the float block; the method replaces each layer named in ``schemes`` (block-relative paths like
    ``attn.q_proj``) by its packed weight (`QuantDense.set_quantized` / `QuantDense.quantize`) and may rescale the
    block's float ops (AWQ). ``stats`` = {layer: {statistic name: value}} over ``tokens`` calibration tokens, for
    the statistics the method asked for.
    """

    index: int
    block: Block
    cfg: ModelConfig
    schemes: dict[str, QuantScheme]
    stats: dict[str, dict[str, jax.Array]]
    tokens: int
    calibration: Calibration | None
    timer: PhaseTimer
    rng: np.random.Generator
    inputs: np.ndarray | None  # the block's inputs (S, L, D) on the host; None for uncalibrated methods
    positions: jax.Array | None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # a method's state from quantize_block

    @property
    def linears(self) -> dict[str, QuantDense]:
        return block_linears(self.block)

    def _need_inputs(self) -> np.ndarray:
        if self.inputs is None:
            raise RuntimeError("this method declared calibrated=False but asked for layer inputs")
        return self.inputs

    @property
    def search_sequences(self) -> np.ndarray:
        """The block inputs of the sequences searches look at (the first ``search_samples``)."""
        return self._need_inputs()[: self.calibration.search_samples]

    def layer_input(self, name: str) -> jax.Array:
        """Layer ``name``'s input on the search sequences, as equal minibatches (M, B, L, K) on the device."""
        return taps.layer_input(self.block, self.search_sequences, self.positions,
                                self.calibration.search_batch_size, name)

    def shared_global_scales(self) -> dict[str, jax.Array]:
        """{layer: the global scale it shares} for the layers a server fuses into one matmul (`FUSED_SIBLINGS`:
        q/k/v, gate/up) when all of them are quantized alike with E4M3 group scales: one global scale over the
        group's current float kernels (`QuantScheme.global_scale`), as a fused NVFP4 layer has. Other layers
        are absent (each keeps its own). Methods pass these to every step that sets scales."""
        out = {}
        for names in FUSED_SIBLINGS:
            schemes = {self.schemes.get(n) for n in names}
            layers = [self.linears.get(n) for n in names]
            if len(schemes) != 1 or None in schemes or any(m is None or m.is_quantized for m in layers):
                continue
            gs = next(iter(schemes)).global_scale([m.kernel.get_value() for m in layers])
            if gs is not None:
                out.update({n: gs for n in names})
        return out

    def sampled_inputs(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Layer inputs at flat token indices of the search sequences: {name: (len(rows[name]), K)}."""
        return taps.sampled_inputs(self.block, self.search_sequences, self.positions, self.calibration.batch_size,
                                   rows)


class Method:
    """Base class of quantization methods (subclass as a frozen dataclass; register with `register_method`).

    name: the registry key (``--method`` on the command line).
    calibrated: whether the method needs calibration data (False: blocks stream straight from the checkpoint).
    packs: whether `quantize_block` leaves the scheme's layers packed (False: a method that only transforms
        float weights, e.g. QAT's clipping init; the driver then assembles a float model).
    """

    name: ClassVar[str]
    packs: ClassVar[bool] = True

    @property
    def calibrated(self) -> bool:
        return True

    def statistics(self) -> tuple[Statistic, ...]:
        """Statistics of every quantized layer's input the driver accumulates over all calibration tokens."""
        return ()

    def prepare_config(self, cfg: ModelConfig) -> ModelConfig:
        """The architecture the quantized model uses (e.g. AWQ adds a foldable scale after BLOOM's GELU)."""
        return cfg

    def validate(self) -> None:
        """Raises `InputError` on invalid options."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any] | None:
        """Quantizes ``ctx.block``'s layers named in ``ctx.schemes``, in place. Returns JSON-serialisable
        per-block facts for the checkpoint's report (deterministic: no timings), or None."""
        raise NotImplementedError

    def observe(self, ctx: BlockContext) -> tuple[tuple[Statistic, ...], tuple[str, ...]]:
        """Statistics of the *finished* block's layer inputs (and for which layers) that the driver accumulates
        during its forward pass over the quantized block; they reach `finish_block`. Default: none."""
        return (), ()

    def finish_block(self, ctx: BlockContext, stats: dict[str, dict[str, jax.Array]]) -> dict[str, Any] | None:
        """Called after that forward pass with the `observe` statistics; returns more per-block facts."""
        return None

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **fields}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Adds a method class to the registry under ``cls.name`` (usable as a decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if name in METHODS and not replace and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods (``method=`` / ``--method``)."""
    return sorted(METHODS)


def get_method(method: str | Method, **options: Any) -> Method:
    """A method instance: a registered name with ``options`` as its fields, or an instance as is."""
    if isinstance(method, Method):
        if options:
            method = dataclasses.replace(method, **options)
    elif isinstance(method, str):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
        try:
            method = METHODS[method](**options)
        except TypeError as e:
            raise InputError(f"method {method!r} does not take these options ({e})") from None
    else:
        raise InputError(f"method must be a name ({', '.join(available_methods())}) or a Method, got "
                         f"{type(method).__name__}")
    method.validate()
    return method
