"""Write the RULER-style prompts kvshrink's eval uses, for kvpress to answer on the same model.

Run with kvshrink's own environment, once per model (the prompts depend on the tokenizer):

    .venv/bin/python benchmarks/peers/kvpress/make_ruler_inputs.py --model qwen2.5-coder-1.5b \
        --contexts 4096 --seeds 0,1,2,3

It writes `ruler-<model>.json` beside this file: every (task, context, seed) prompt as token ids with its references
and generation budget, the model's stop ids, and the directory of the converted model that kvshrink loads (kvpress
loads the same weights from it, in the same dtype). Scoring is done back in kvshrink's environment by
`compare_ruler.py`, with kvshrink's own `string_match_all`, so both libraries are scored by one function.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvshrink.eval.ruler import TASKS, ruler_sample
from kvshrink.eval.scoring import stop_tokens
from kvshrink.io import atomic_write_text
from kvshrink.models import default_dtype, load_model

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--contexts", default="4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (one prompt per task and seed)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("-o", "--output", help="default: ruler-<model>.json beside this script")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        ap.error(f"unknown RULER tasks {unknown}; choose from {', '.join(TASKS)}")
    model, tok = load_model(args.model)
    dtype = default_dtype(args.model)
    model_dir = Path(getattr(model.config, "_name_or_path", "") or "")
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model}: no converted model directory found ({model_dir!s}); kvpress needs one")
    prompts = []
    for context in (int(c) for c in args.contexts.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for task in tasks:
                s = ruler_sample(task, tok, context, seed)
                prompts.append({"task": task, "context": context, "seed": seed, "input_ids": s.input_ids,
                                "references": s.references, "max_new_tokens": s.max_new_tokens})
    out = Path(args.output) if args.output else HERE / f"ruler-{args.model}.json"
    atomic_write_text(out, json.dumps({"model": args.model, "model_dir": str(model_dir),
                                       "dtype": str(dtype).removeprefix("torch."),
                                       "stop_ids": stop_tokens(model, tok), "prompts": prompts}))
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
