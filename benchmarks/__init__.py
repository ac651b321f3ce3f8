"""afpq-jax's experiments and benchmarks: the code behind every figure in README.md and BUILD_NOTES.md.

Run from the repository root as ``python -m benchmarks.<name> [flags]`` (``--help`` on each):
  perplexity (its tables: rtn, methods, w4a8, micro, gemma3), qat, qwix_smollm2 — the README's perplexity
    tables (SmolLM2-135M and Gemma 3 270M, held-out Wikipedia); each result is one JSON line in results/ with
    the commit that produced it.
  quantized_matmul, autotune, roofline, device_check — the fused matmul kernels: timings against the XLA path,
    measured tilings, byte / op counts, and the one-shot accelerator check.
  quantize, generate, w4a8_cpu, spill_memory — quantizer throughput, generation speed, the W·A8 CPU path, peak RSS
    with and without a memory budget.
Shared protocol (the commit, the results file, the evaluation text) lives in `experiment`. Everything here uses
afpq-jax's public API only (a test checks the imports); tests import these modules, not their paths.
"""
