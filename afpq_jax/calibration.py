"""Public view of the calibration wing: data, the method protocol and registry, and the taps on a block's
linear-layer inputs a method (or a script measuring one) builds on.

A method is a `Method` subclass registered with `register_method`: it names the `Statistic`s it needs and turns
each float block into a quantized one given a `BlockContext`. `checkpoint_weights(path).block(i, cfg, dtype)`
loads one float decoder block; `input_statistics`, `layer_input`, `sampled_inputs` and `block_forward` are the
passes the driver runs over a block. (`Calibration`, the data a method calibrates on, lives at the root.)
"""

from afpq_jax._src.calibration.data import sample_windows
from afpq_jax._src.calibration.method import BlockContext, Method, available_methods, get_method, register_method
from afpq_jax._src.calibration.taps import (ABS_MAX, ABS_SUM, XTX, Statistic, input_statistics, layer_input,
                                            minibatches, sampled_inputs)
from afpq_jax._src.calibration.taps import forward as block_forward
from afpq_jax._src.calibration.timer import PhaseTimer
from afpq_jax._src.layers import record_inputs
from afpq_jax._src.loading import CheckpointWeights, FloatWeights, ModelWeights, checkpoint_weights
from afpq_jax._src.models.transformer import block_linears

__all__ = ["ABS_MAX", "ABS_SUM", "XTX", "BlockContext", "CheckpointWeights", "FloatWeights", "Method",
           "ModelWeights", "PhaseTimer", "Statistic", "available_methods", "block_forward", "block_linears",
           "checkpoint_weights", "get_method", "input_statistics", "layer_input", "minibatches",
           "record_inputs", "register_method", "sample_windows", "sampled_inputs"]
