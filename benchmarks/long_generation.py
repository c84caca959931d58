"""Memory over a long generation: a prompt of held-out text, then N greedy tokens, the cache's memory report
(bytes held over a 16-bit DynamicCache of the same tokens) every few hundred tokens. Does a method hold its budget
once the generated tokens outnumber a good part of the prompt?

    PYTHONPATH=src python benchmarks/long_generation.py --model smollm2-135m --prompt-tokens 2048 --new-tokens 2000 \\
        --methods "kivi:bits=2;snapkv:budget=0.25 + kivi:bits=2;snapkv:budget=0.25,generated=budget + kivi:bits=2" \\
        -o benchmarks/results/long-generation-smollm2.jsonl

Methods are separated by ';' (a spec may hold commas). Records are appended as each method finishes; a rerun skips
the (model, method, prompt, new tokens) already recorded.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kvshrink as ks
from kvshrink.eval.corpus import heldout_text
from kvshrink.io import atomic_write_text


def _key(r: dict) -> tuple:
    return r["model"], r["method"], r["prompt_tokens"], r["new_tokens"]


def measure(model, ids: torch.Tensor, spec: str, new_tokens: int, every: int) -> dict:
    cache = ks.make_cache(model, spec)
    points, out = [], []
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:]
        for step in tqdm(range(new_tokens), desc=spec[:40], unit="tok", leave=False):
            nxt = logits.argmax(-1)
            out.append(int(nxt))
            if step % every == 0 or step == new_tokens - 1:
                rep = cache.memory_report()
                points.append({"generated": step, "tokens": rep["tokens"], "ratio": round(rep["ratio"], 5),
                               "nbytes": rep["nbytes"]})
            logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:]
    return {"points": points, "seconds": round(time.perf_counter() - start, 2), "ids": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, help="model dtype (default: what ks.load_model picks)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250, help="tokens between two memory reports")
    ap.add_argument("--methods", required=True, help="specs separated by ';'")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    if args.prompt_tokens < 1 or args.new_tokens < 1 or args.every < 1:
        raise SystemExit("--prompt-tokens, --new-tokens and --every must be positive")
    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    for spec in specs:
        ks.build_method(spec)  # a bad spec fails before the model loads
    path = Path(args.output)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = {_key(r) for r in records}
    model, tok = ks.load_model(args.model, dtype=args.dtype)
    ids = tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :args.prompt_tokens]
    if ids.shape[1] < args.prompt_tokens:
        raise SystemExit(f"the held-out text has {ids.shape[1]} tokens, fewer than --prompt-tokens")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for spec in specs:
        key = (args.model, spec, args.prompt_tokens, args.new_tokens)
        if key in done:
            print(f"{spec}: recorded")
            continue
        got = measure(model, ids, spec, args.new_tokens, args.every)
        record = {"model": args.model, "dtype": dtype, "method": spec, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **got}
        records.append(record)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        first, last = got["points"][0], got["points"][-1]
        print(f"{spec}: ratio {first['ratio']:.3f} after the prompt, {last['ratio']:.3f} after {args.new_tokens} "
              f"tokens ({last['tokens']} tokens seen); {got['seconds']:.0f} s")


if __name__ == "__main__":
    main()
