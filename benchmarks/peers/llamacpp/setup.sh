#!/usr/bin/env bash
# A separate virtual environment for llama.cpp through llama-cpp-python (PyPI ships it as source only: the build
# compiles llama.cpp with CMake and takes about 10 minutes on 2 cores; it needs cmake and a C++ compiler).
# Usage: benchmarks/peers/llamacpp/setup.sh   (creates benchmarks/peers/llamacpp/.venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
# Native CPU build (AVX2/FMA where the CPU has them), no GPU backends; the version is pinned so figures compare.
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF" \
  "$here/.venv/bin/pip" install -v --no-binary llama-cpp-python "llama-cpp-python==0.3.36" > "$here/.venv/build.log" 2>&1 \
  || { echo "llama-cpp-python build failed; see $here/.venv/build.log" >&2; exit 1; }
"$here/.venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
