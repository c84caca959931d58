"""The extra prefill cost of KVzip's reconstruction pass: seconds of a plain prefill (`DynamicCache`) against
kvzip's prefill plus its pass, on held-out text, with the pass's attention through the fused CPU path
(`ComposedLayer._probe_attention`) and through the general one (softmax over materialised scores), in one process,
alternating, best of `--repeat`. Writes a JSON record with `-o`.

    PYTHONPATH=src python benchmarks/kvzip_cost.py --model smollm2-135m --tokens 4096 --repeat 1 \
        -o benchmarks/results/kvzip-cost-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import torch

import kvshrink as ks
from kvshrink.eval.bench import context_ids
from kvshrink.eval.corpus import heldout_text
from kvshrink.io import atomic_write_text
from kvshrink.layers import composed

PATHS = ("fused", "general")


def timed(model, ids, spec: str, path: str | None) -> tuple[float, float, int]:
    """(total seconds, pass seconds, pass tokens) of one prefill with `spec`; `path` chooses the pass's attention."""
    flash = composed._FLASH_CPU
    composed._FLASH_CPU = flash if path != "general" else None
    try:
        cache = ks.make_cache(model, spec)
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        total = time.perf_counter() - start
    finally:
        composed._FLASH_CPU = flash
    made = getattr(cache, "reconstruction", {})
    return total, made.get("seconds", 0.0), made.get("tokens", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--spec", default="kvzip:budget=0.25", help="the kvzip spec (a composition is fine)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"pass attention paths timed: {', '.join(PATHS)}")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("-o", "--output", help="JSON record")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"--paths: a comma-separated choice of {', '.join(PATHS)}, got {args.paths!r}")
    model, tok = ks.load_model(args.model)
    text_ids = tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids
    print(f"model {args.model} ({model.dtype}), {torch.get_num_threads()} threads, {args.spec}")
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        ids = context_ids(text_ids, n)
        best: dict[str, tuple[float, float, int]] = {}
        for _ in range(args.repeat):
            for name, spec, path in [("full", "full", None)] + [(p, args.spec, p) for p in paths]:
                got = timed(model, ids, spec, path)
                if name not in best or got[0] < best[name][0]:
                    best[name] = got
        full = best["full"][0]
        row = {"tokens": n, "full_prefill_s": round(full, 2)}
        for p in paths:
            total, passed, pass_tokens = best[p]
            row[p] = {"total_s": round(total, 2), "pass_s": round(passed, 2), "pass_tokens": pass_tokens,
                      "total_over_full": round(total / full, 2)}
            print(f"{n} tokens, {p} pass: {total:.1f} s = prefill {total - passed:.1f} + pass {passed:.1f} "
                  f"({pass_tokens} tokens); plain prefill {full:.1f} s: {total / full:.2f}x")
        rows.append(row)
    if args.output:
        record = {"model": args.model, "dtype": str(model.dtype), "spec": args.spec, "threads": torch.get_num_threads(),
                  "repeat": args.repeat, "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                  "rows": rows}
        atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
