# Quick start: `make serve` and `make test` each do all of their own set-up.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/tiny

.PHONY: serve test venv test-venv bench bench-graph clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test-venv: $(VENV)/.installed-test

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) -m expertmesh init-model --preset tiny --out $(MODEL_DIR)

serve: $(VENV)/.installed $(MODEL_DIR)/config.json
	$(PY) -m expertmesh generate --model $(MODEL_DIR) --prompt "The mixture of experts" --max-tokens 32

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) bench/engine_vs_hf.py

# The actor graph (1 attention actor, 1 router, 2 and 4 expert shards) against local mode.
bench-graph: $(VENV)/.installed-test
	$(PY) bench/actor_graph.py --transport all

clean:
	rm -rf $(VENV) models
