"""Public view of the methods' pure math, for use outside the built-in models (e.g. your own layers).

GPTQ: `gptq_quantize(kernel, hessian, fmt, ...)` with `accumulate_hessian` to build ``H = 2/n sum x x^T``;
the clipping search: `clip_search(kernel, inputs, fmt, ...)` -> per-group ``(r_neg, r_pos)`` for
`afpq_jax.quantize(..., clip_ratios=...)`; AWQ's scaling groups, search and folds for the built-in blocks;
`output_mse` / `group_output_error` to measure a quantized kernel on inputs.
"""

from afpq_jax._src.algorithms.awq import search_scale
from afpq_jax._src.algorithms.folds import ScalingGroup, fold_scale, scaling_groups, tie_heads
from afpq_jax._src.algorithms.clip import clip_search, group_output_error, shrink_grid
from afpq_jax._src.algorithms.gptq import accumulate_hessian, damping_schedule, gptq_quantize, output_mse

__all__ = ["ScalingGroup", "accumulate_hessian", "clip_search", "damping_schedule", "fold_scale",
           "gptq_quantize", "group_output_error", "output_mse", "scaling_groups", "search_scale", "shrink_grid",
           "tie_heads"]
