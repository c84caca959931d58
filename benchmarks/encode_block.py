"""Time `codecs.quant.encode_block` (quantize + pack of one block of tokens) through the compiled op against the
PyTorch steps, on the shapes a decode step flushes (32 tokens) and a prefill stores (4,096 tokens).

    python benchmarks/encode_block.py --json benchmarks/results/encode-block-<commit>-<date>.json

Both paths give the same bits (tests/test_cpu_decode.py). Each figure is the median of `--repeat` calls after one
warm-up call, in one process; the native path is forced at every size (a checkout that capped it by rows gets the
cap lifted here, so old and new code can be compared on the same shapes)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

SHAPES = [  # (name, [B, H, T, D])
    ("qwen-prefill", (1, 2, 4096, 128)), ("smollm2-prefill", (1, 3, 4096, 64)),
    ("qwen-flush", (1, 2, 32, 128)), ("smollm2-flush", (1, 3, 32, 64)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    ap.add_argument("--json", default="", help="write the record here (atomically)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")

    from cpu_attention import _time  # this folder's kernel benchmark: median seconds per call after a warm-up

    from kvshrink.codecs import quant
    from kvshrink.codecs.quant import GroupCodec
    from kvshrink.kernels import cpu

    if not cpu.available():
        sys.exit("the compiled CPU extension is not available: nothing native to time")
    native = quant._native
    if hasattr(quant, "NATIVE_MAX_ROWS"):  # older checkouts capped the native path by rows
        quant.NATIVE_MAX_ROWS = 1 << 62
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in SHAPES:
        x = torch.randn(*shape, generator=gen)
        for axis in ("channel", "token"):
            spec = GroupCodec(args.bits, 32, axis, "none")
            quant._native = native
            n_ms = 1e3 * _time(lambda: quant.encode_block(x, spec), args.repeat)
            quant._native = None
            t_ms = 1e3 * _time(lambda: quant.encode_block(x, spec), args.repeat)
            quant._native = native
            rows.append({"shape": name, "dims": list(shape), "axis": axis, "bits": args.bits, "group": 32,
                         "native_ms": round(n_ms, 4), "torch_ms": round(t_ms, 4),
                         "torch_over_native": round(t_ms / n_ms, 2)})
            print(f"{name:16s} {axis:8s} native {n_ms:8.3f} ms  torch {t_ms:8.3f} ms  {t_ms / n_ms:5.2f}x")
    if args.json:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(quant.__file__))).stdout.strip()
        except OSError:
            commit = ""
        record = {"benchmark": "encode_block", "commit": commit, "threads": torch.get_num_threads(),
                  "repeat": args.repeat, "machine": platform.processor() or platform.machine(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
