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

demo: $(STAMP)
	$(PY) -m afpq_jax.convert $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_quantize.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
