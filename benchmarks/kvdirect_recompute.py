"""KV-Direct's recompute cost against reading a cache: seconds per decoding step at a few context lengths.

For each context the same held-out text is prefilled, then `--steps` greedy tokens are decoded one at a time with:
- `full`: transformers' `DynamicCache` (reading stored keys and values);
- `kvdirect:scheme=layer`: each layer recomputes the keys/values of its evicted tokens from its own residuals;
- `kvdirect:scheme=token` with `materialize=0` and `materialize=L/2`: one residual per token, the evicted prefix
  pushed through the (recomputed) layers every step.
All use the same budget of materialised recent tokens (`--window`). Every method's greedy tokens are checked
against `full`'s (the token schemes are exact; a mismatch is reported, not hidden). Reported: seconds per step,
its ratio to `full`, the recompute share of the step, the bytes each cache holds, and how much the resident set grew
during the last step (the step's transient memory: scores and activations of the recompute; `recompute_chunk` bounds
it to heads x chunk x prefix scores; it depends on the attention kernel torch picks, hence measured here, not in a
unit test).

    .venv/bin/python benchmarks/kvdirect_recompute.py --model smollm2-135m --contexts 512,1024,2048 \
        --json benchmarks/results/kvdirect-recompute-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache

import kvshrink as ks
from kvshrink.eval.corpus import pydoc_text, split
from kvshrink.eval.memory import PeakMemory


@torch.no_grad()
def decode(model, cache, ids: torch.Tensor, steps: int) -> tuple[list[int], float, int]:
    """Greedy tokens, seconds per step, and the memory growth (bytes) of the last step over its start."""
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = [int(nxt)]
    elapsed = 0.0
    for i in range(steps):
        # only the last step is probed, and the probe's set-up (a malloc_trim) stays outside the timed call
        with PeakMemory() if i == steps - 1 else nullcontext() as peak:
            t0 = time.perf_counter()
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            elapsed += time.perf_counter() - t0
        tokens.append(int(nxt))
    return tokens, elapsed / steps, peak.growth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window", type=int, default=64, help="recent tokens kept materialised (the budget)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    model, tok = ks.load_model(args.model)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    methods = ["full", f"kvdirect:scheme=layer,window={args.window}",
               f"kvdirect:scheme=token,window={args.window}",
               f"kvdirect:scheme=token,window={args.window},materialize={layers // 2}"]
    text = tok(split(pydoc_text())[1], return_tensors="pt", add_special_tokens=False).input_ids
    rows = []
    print("| context | method | s/step | vs full | recompute share | cache MiB | step growth MiB | greedy = full |")
    print("|---|---|---|---|---|---|---|---|")
    for context in (int(c) for c in args.contexts.split(",")):
        ids = text[:, :context]
        ref = None
        for spec in methods:
            cache = DynamicCache(config=model.config) if spec == "full" else ks.make_cache(model, spec)
            before = getattr(getattr(cache.layers[-1], "runner", None), "recompute_seconds", 0.0)
            tokens, per_step, growth = decode(model, cache, ids, args.steps)
            runner = getattr(cache.layers[-1], "runner", None)
            recompute = (runner.recompute_seconds - before) if runner is not None else None
            if spec == "full":
                ref, ref_step = tokens, per_step
                nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            else:
                nbytes = cache.memory_report()["nbytes"]
            row = {"model": args.model, "context": context, "method": spec, "steps": args.steps,
                   "seconds_per_step": per_step, "vs_full": per_step / ref_step, "cache_bytes": nbytes,
                   "recompute_seconds_total": recompute, "exact": tokens == ref, "step_growth_bytes": growth,
                   "threads": torch.get_num_threads()}
            rows.append(row)
            share = "" if recompute is None else f"{recompute / (per_step * args.steps):.2f}"
            print(f"| {context} | `{spec}` | {per_step:.3f} | {row['vs_full']:.1f}x | {share} | "
                  f"{nbytes / 2**20:.2f} | {growth / 2**20:.0f} | {'yes' if row['exact'] else 'NO'} |", flush=True)
    if args.json:
        from kvshrink.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"window": args.window, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
