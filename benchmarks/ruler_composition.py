"""What a RULER-style prompt is made of: the share of its tokens inside needle values (UUIDs, numbers) and keys.

    .venv/bin/python benchmarks/ruler_composition.py --model qwen2.5-coder-1.5b --context 4096 --seeds 0,1,2,3 \
        -o benchmarks/results/ruler-composition-qwen-4k.json

A token budget under the share of a prompt's tokens that may have to be repeated exactly cannot keep them all, and a
query-agnostic policy (KVzip's ranking) does not know which needle the question will ask for. For each task and seed
this counts the prompt's tokens, the UUIDs and 7-digit numbers in it (each tokenized on its own after a space, as
the prompt writes them) and their share of the prompt. Needs the tokenizer only (no model weights are run).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from kvshrink.eval import ruler
from kvshrink.io import atomic_write_text
from kvshrink.models import resolve_model

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NUMBER = re.compile(r"(?<![0-9a-f-])\d{7}(?![0-9a-f-])")  # not a run of digits inside a UUID


def composition(tokenizer, task: str, context: int, seed: int) -> dict:
    """Counts for one prompt: tokens, UUIDs and 7-digit numbers, the tokens they take, and that share."""
    sample = ruler.ruler_sample(task, tokenizer, context, seed=seed)
    text = tokenizer.decode(sample.input_ids)
    out = {"task": task, "seed": seed, "prompt_tokens": len(sample.input_ids)}
    for name, pattern in (("uuids", UUID), ("numbers", NUMBER)):
        found = pattern.findall(text)
        tokens = sum(len(tokenizer(" " + f, add_special_tokens=False).input_ids) for f in found)
        out[name] = len(found)
        out[f"{name}_tokens"] = tokens
        out[f"{name}_share"] = round(tokens / len(sample.input_ids), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds")
    ap.add_argument("--tasks", default=",".join(t for t in ruler.TASKS if t.startswith("niah")),
                    help=f"comma-separated tasks of: {', '.join(ruler.TASKS)}")
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON file to write (atomically)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(ruler.TASKS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    rows = [composition(tokenizer, t, args.context, s) for t in tasks for s in seeds]
    atomic_write_text(args.output, json.dumps({"model": args.model, "context": args.context, "prompts": rows},
                                              indent=1) + "\n")
    for r in rows:
        print(f"{r['task']:16s} seed {r['seed']}: {r['prompt_tokens']} tokens, UUIDs {r['uuids_share']:.3f}, "
              f"7-digit numbers {r['numbers_share']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
