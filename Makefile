# Quick start: `make serve` and `make test` each do all of their own set-up.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/tiny

.PHONY: serve test venv test-venv bench bench-graph bench-serve clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	# The dashboard test renders the page in Debian's headless Chromium; installed when we can (root + apt).
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } \
		|| echo "note: chromium not installed; the dashboard browser test will be skipped"
	touch $@

venv: $(VENV)/.installed

test-venv: $(VENV)/.installed-test

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) -m expertmesh init-model --preset tiny --out $(MODEL_DIR)

# The OpenAI-compatible server on 127.0.0.1:8000 (Ray Serve); prints the URL, an API key and a curl line.
serve: $(VENV)/.installed $(MODEL_DIR)/config.json
	$(PY) -m expertmesh serve --model $(MODEL_DIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) bench/engine_vs_hf.py

# The actor graph (1 attention actor, 1 router, 2 and 4 expert shards) against local mode.
bench-graph: $(VENV)/.installed-test
	$(PY) bench/actor_graph.py --transport all

# Load on `expertmesh serve` (small preset, local mode): throughput, TTFT and ITL at concurrency 1, 8 and 32.
bench-serve: $(VENV)/.installed-test
	$(PY) bench/serve_load.py --json bench/serve_load_results.json

clean:
	rm -rf $(VENV) models
