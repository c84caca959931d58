"""The Triton kernels compile for a real GPU target (sm_90) on this machine, GPU or not: the interpreter, where
tests/test_kernels.py runs them without a GPU, accepts code that the compiler refuses (a constexpr defined again in
an unrolled loop passed every interpreter test and failed to compile on an H200). tests/compile_kernels.py runs in
its own process, without TRITON_INTERPRET, since the interpreter replaces the kernels when they are defined."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the kernels need Triton (installed by `make setup`)")


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend(), reason="this Triton build has no NVIDIA backend to compile for")
def test_every_kernel_variant_compiles_for_a_gpu_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch says what it needs (quantize: fusion off)
    script = Path(__file__).with_name("compile_kernels.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    compiled = [line for line in r.stdout.splitlines() if line.startswith("compiled ")]
    assert len(compiled) == 13 and "all compiled" in r.stderr, r.stdout[-2000:]
