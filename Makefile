# gemma_dist: `make serve` runs the default model, `make test` runs the whole test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (taken from local disk on the dev/CI machines). Override for CUDA:
#   make install TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PROMPT ?= The three primary colors are

.PHONY: install serve demo test bench clean-cache

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

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) bench/bench_model.py
	$(PY) bench/bench_engine.py

clean-cache:
	rm -rf $${GEMMA_DIST_CACHE:-$$HOME/.cache/gemma_dist}
