"""KV-Direct's exactness by dtype: greedy tokens of `kvdirect` against `full` (DynamicCache) on held-out prompts,
with the model in fp32 and in bf16.

Recomputing keys and values from stored residuals is exact arithmetic in fp32 here (the same projections give the
same numbers), but in bf16 a projection of a few evicted tokens runs on other matrix shapes than the prefill's did,
so its rounding can differ and a greedy choice can flip. This measures how often and how early: per prompt, whether
all `--new` tokens equal `full`'s, the first step that differs, and the share of steps equal up to it.

    PYTHONPATH=src python benchmarks/kvdirect_dtype.py --model smollm2-135m --prompts 8 --context 512 --new 32 \\
        -o benchmarks/results/kvdirect-dtype-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.eval.corpus import heldout_text
from kvshrink.io import atomic_write_text


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, new: int) -> list[int]:
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = [int(nxt)]
    for _ in range(new - 1):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--schemes", default="token,layer")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    if min(args.prompts, args.context, args.new) < 1 or args.window < 0:
        raise SystemExit("--prompts, --context and --new must be positive, --window >= 0")
    rows = []
    for dtype in args.dtypes.split(","):
        model, tok = ks.load_model(args.model, dtype=dtype)
        text = tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids
        if text.shape[1] < args.prompts * args.context:
            raise SystemExit(f"the held-out text has {text.shape[1]} tokens: fewer than prompts x context")
        for i in range(args.prompts):
            ids = text[:, i * args.context:(i + 1) * args.context]
            start = time.perf_counter()
            ref = greedy(model, DynamicCache(config=model.config), ids, args.new)
            for scheme in args.schemes.split(","):
                spec = f"kvdirect:scheme={scheme},window={args.window}"
                got = greedy(model, ks.make_cache(model, spec), ids, args.new)
                first = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None)
                rows.append({"dtype": dtype, "prompt": i, "method": spec, "exact": first is None,
                             "first_difference": first, "tokens": got, "reference": ref})
                print(f"{dtype} prompt {i} {spec}: " + ("same tokens" if first is None else
                                                         f"differs from step {first}"), flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = {}
    for r in rows:
        s = summary.setdefault(f"{r['dtype']} {r['method']}", {"prompts": 0, "exact": 0, "first_differences": []})
        s["prompts"] += 1
        s["exact"] += r["exact"]
        if not r["exact"]:
            s["first_differences"].append(r["first_difference"])
    for key, s in summary.items():
        print(f"{key}: {s['exact']} of {s['prompts']} prompts give full's {args.new} tokens"
              + (f"; the others differ from step {sorted(s['first_differences'])}" if s["first_differences"] else ""))
    atomic_write_text(args.output, json.dumps({"model": args.model, "context": args.context, "new": args.new,
                                               "window": args.window, "threads": torch.get_num_threads(),
                                               "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
