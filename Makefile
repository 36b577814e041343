# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (see DEVELOPERS.md).
TORCH ?= torch==2.13.0

TOOLS_STAMP := .tools/.installed-stamp

.PHONY: install tools manifests demo test test-fast lint bench clean

install: $(STAMP) $(TOOLS_STAMP)

# helm, kubectl, prometheus, promtool for the chart and monitoring tests (checksums and versions checked).
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): scripts/install-tools.sh
	bash scripts/install-tools.sh
	touch $@

# The plain-YAML install (kubectl apply -k manifests/) from the chart; tests/chart/test_chart_render.py fails on drift.
manifests: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/kubetrain crd --write manifests/crd.yaml --write charts/kubetrain/crds/llmtrainingjobs.yaml
	$(PY) scripts/dashboards.py
	$(PY) scripts/render_manifests.py

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[trainer,operator,dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/kubetrain run manifests/examples/tiny-cpu.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(TOOLS_STAMP)
	$(PY) -m pytest -q -x --durations=15

test-fast: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/prepare_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
