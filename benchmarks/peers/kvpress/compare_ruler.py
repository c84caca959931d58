"""RULER-style scores of kvpress's answers next to kvshrink's, on the same prompts, scored by one function.

Run with kvshrink's environment:

    .venv/bin/python benchmarks/peers/kvpress/compare_ruler.py --inputs benchmarks/peers/kvpress/ruler-qwen2.5-coder-1.5b.json \
        --ours benchmarks/results/eval-ruler-qwen.jsonl

kvpress's answers (`results-ruler-<model>.jsonl`) are scored with kvshrink's `string_match_all` against the
references of the prompts in the inputs file; kvshrink's rows are its eval records for the same model, contexts and
seeds. Prints one markdown table: per-task means, their average, and the prompts each row covers.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from jsonl import records
from kvshrink.eval.ruler import TASKS, string_match_all

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--theirs", help="default: results-ruler-<model>.jsonl beside this script")
    ap.add_argument("--ours", help="kvshrink eval records (JSONL) for the same prompts")
    args = ap.parse_args()
    inputs = json.loads(Path(args.inputs).read_text())
    refs = {(p["task"], p["context"], p["seed"]): p["references"] for p in inputs["prompts"]}
    scores: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    theirs = Path(args.theirs) if args.theirs else HERE / f"results-ruler-{inputs['model']}.jsonl"
    for r in records(theirs):
        key = (r["task"], r["context"], r["seed"])
        if key in refs:
            label = "kvpress full" if r["press"] == "full" else f"kvpress {r['press']} (keeps {r['budget']:g})"
            scores[(label, r["context"])][r["task"]].append(string_match_all(r["answer"], refs[key]))
    if args.ours:
        for r in records(Path(args.ours)):
            key = (r.get("task"), r.get("context"), r.get("seed"))
            if r.get("model") == inputs["model"] and key in refs:
                scores[(f"kvshrink `{r['method']}`", r["context"])][r["task"]].append(r["metrics"][r["task"]])
    tasks = [t for t in TASKS if any(t in v for v in scores.values())]
    head = ["row", "context", *tasks, "avg", "prompts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, context), by_task in sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        means = [sum(v) / len(v) for t in tasks if (v := by_task.get(t))]
        cells = [f"{sum(by_task[t]) / len(by_task[t]):.2f}" if by_task.get(t) else "" for t in tasks]
        n = sum(len(v) for v in by_task.values())
        lines.append("| " + " | ".join([label, str(context), *cells, f"{sum(means) / len(means):.3f}", str(n)]) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
