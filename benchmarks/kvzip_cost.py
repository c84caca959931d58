"""The extra prefill cost of KVzip's reconstruction pass: seconds of the prefill (through SnapKV's layer, which
scores without a pass) against the prefill plus the pass (kvzip), on held-out text.

    PYTHONPATH=src python benchmarks/kvzip_cost.py --model smollm2-135m --tokens 1024,2048 --repeat 2
"""
from __future__ import annotations

import argparse
import time

import torch

import kvshrink as ks
from kvshrink.eval.corpus import heldout_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", default="1024,2048")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model, tok = ks.load_model(args.model)
    text_ids = tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids
    print(f"model {args.model}, {torch.get_num_threads()} threads, budget {args.budget}, chunk {args.chunk}")
    for n in (int(t) for t in args.tokens.split(",")):
        ids = text_ids[:, :n]
        best = {}
        for _ in range(args.repeat):
            for spec in (f"snapkv:budget={args.budget}", f"kvzip:budget={args.budget},chunk={args.chunk}"):
                cache = ks.make_cache(model, spec)
                start = time.perf_counter()
                with torch.no_grad():
                    model(ids, past_key_values=cache, use_cache=True)
                total = time.perf_counter() - start
                passed = getattr(cache, "reconstruction", {}).get("seconds", 0.0)
                name = spec.split(":")[0]
                if name not in best or total < best[name][0]:
                    best[name] = (total, passed, getattr(cache, "reconstruction", {}).get("tokens", 0))
        snap, (kv_total, kv_pass, pass_tokens) = best["snapkv"][0], best["kvzip"]
        print(f"{n} tokens: prefill {snap:.2f} s (snapkv); kvzip {kv_total:.2f} s = prefill {kv_total - kv_pass:.2f} s "
              f"+ pass {kv_pass:.2f} s ({pass_tokens} tokens): the pass is {kv_pass / (kv_total - kv_pass):.2f}x the "
              "prefill")


if __name__ == "__main__":
    main()
