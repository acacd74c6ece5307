# Quick start: `make serve` and `make test` each do all of their own set-up.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Every target runs with the venv's bin first on PATH, as an activated shell does: the CPU kernels' build then
# finds the same ninja (the venv's) whichever way it is started, and tools the package installs are found.
export PATH := $(abspath $(VENV))/bin:$(PATH)
MODEL_DIR ?= models/tiny

.PHONY: serve test venv test-venv bench bench-graph bench-serve bench-llamacpp image infra-check serve-config clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# checkov in a venv of its own: it pins an hcl2 fork that conflicts with python-hcl2. Best effort: the
# infra checks say so and skip it when it could not be installed.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/.installed:
	{ test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV) || python3 -m venv $(CHECKOV_VENV); } && \
		$(CHECKOV_VENV)/bin/python -m pip install -q checkov==3.3.30 && touch $@ \
		|| echo "note: checkov not installed; the infra checks will skip it"

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

test: $(VENV)/.installed-test $(CHECKOV_VENV)/.installed
	$(PY) -m pytest -q

# Offline validation of infra/ and terraform/: terraform fmt, HCL structure, checkov, the manifests against
# the vendored KubeRay CRDs and Kubernetes' schemas, yamllint, and the Serve config against the CLI's.
infra-check: $(VENV)/.installed-test $(CHECKOV_VENV)/.installed
	$(PY) -m infra.check

# The Serve config the KubeRay manifests carry, rendered by expertmesh itself (a test checks they agree).
serve-config: $(VENV)/.installed
	{ echo "# Rendered by \`make serve-config\` from infra/serve/deployment-gpu.yaml; tests/infra check it matches."; \
	  echo "# For \`serve deploy\` on an existing GPU Ray cluster (e.g. \`ray up infra/ray/cluster-aws-gpu.yaml\`)."; \
	  $(PY) -m expertmesh serve --print-serve-config --model /models/default --served-model-name expertmesh \
	    --dtype bfloat16 --deployment infra/serve/deployment-gpu.yaml --host 0.0.0.0 --port 8000 \
	    --min-replicas 1 --max-replicas 2; } > infra/serve/serve-config.yaml

bench: $(VENV)/.installed-test
	$(PY) bench/engine_vs_hf.py

# The actor graph (1 attention actor, 1 router, 2 and 4 expert shards) against local mode.
bench-graph: $(VENV)/.installed-test
	$(PY) bench/actor_graph.py --transport all

# Load on `expertmesh serve` (small preset, local mode): throughput, TTFT and ITL at concurrency 1, 8 and 32.
bench-serve: $(VENV)/.installed-test
	$(PY) bench/serve_load.py --json bench/serve_load_results.json

# builds llama.cpp from its PyPI source distribution (cached outside the repository) and races it on `small`
bench-llamacpp: $(VENV)/.installed-test
	$(PY) bench/engine_vs_llamacpp.py --json bench/engine_vs_llamacpp_results.json
	$(PY) bench/quant_accuracy.py --json bench/quant_accuracy_results.json

# The serving image (infra/docker/Dockerfile): VARIANT=cuda (default) or cpu. Needs Docker with BuildKit.
IMAGE ?= expertmesh:0.1.0
VARIANT ?= cuda

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker not found on PATH; install Docker (with BuildKit) to build $(IMAGE)" >&2; exit 1; }
	docker build -f infra/docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

clean:
	rm -rf $(VENV) models
