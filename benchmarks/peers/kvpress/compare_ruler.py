"""RULER-style scores of kvpress's answers next to kvshrink's, on the same prompts, scored by one function.

Run with kvshrink's environment:

    .venv/bin/python benchmarks/peers/kvpress/compare_ruler.py --inputs benchmarks/peers/kvpress/ruler-qwen2.5-coder-1.5b.json \
        --ours benchmarks/results/eval-ruler-qwen.jsonl

kvpress's answers (`results-ruler-<model>.jsonl`) are scored with kvshrink's `string_match_all` against the
references of the prompts in the inputs file; kvshrink's rows are its eval records for the same model, contexts and
seeds (`--methods` picks some). Prints one markdown table: per-task means, their average with its 95% bootstrap
interval, the difference from a reference row in points (paired by prompt, with its interval; the bootstrap is
`benchmarks/ruler_table.py`'s), and the prompts each row covers. The reference is kvpress's own uncompressed row
unless `--reference` names another row by its label (for example "kvshrink `full`", or one of kvshrink's profiles
to compare a peer with it prompt by prompt).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from jsonl import records
from kvshrink.eval.ruler import TASKS, string_match_all

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))
from ruler_table import interval, prompt_order, resamples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--theirs", help="default: results-ruler-<model>.jsonl beside this script")
    ap.add_argument("--ours", help="kvshrink eval records (JSONL) for the same prompts")
    ap.add_argument("--methods", help="kvshrink's method specs to show, separated by ';' (default: every one)")
    ap.add_argument("--reference", default="kvpress full", help="label of the row the differences are taken from")
    ap.add_argument("--seeds", help="comma-separated seeds to keep (default: every prompt of the inputs)")
    args = ap.parse_args()
    wanted = {m.strip() for m in args.methods.split(";") if m.strip()} if args.methods else None
    inputs = json.loads(Path(args.inputs).read_text())
    try:
        seeds = {int(x) for x in args.seeds.split(",") if x.strip()} if args.seeds else None
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    refs = {(p["task"], p["context"], p["seed"]): p["references"] for p in inputs["prompts"]
            if seeds is None or p["seed"] in seeds}
    if not refs:
        ap.error(f"no prompt of {args.inputs} has seeds {sorted(seeds)}")
    scores: dict[tuple[str, int], dict[tuple[str, int], float]] = defaultdict(dict)
    theirs = Path(args.theirs) if args.theirs else HERE / f"results-ruler-{inputs['model']}.jsonl"
    for r in records(theirs):
        key = (r["task"], r["context"], r["seed"])
        if key in refs:
            label = "kvpress full" if r["press"] == "full" else f"kvpress {r['press']} (keeps {r['budget']:g})"
            scores[(label, r["context"])][(r["task"], r["seed"])] = string_match_all(r["answer"], refs[key])
    if args.ours:
        for r in records(Path(args.ours)):
            key = (r.get("task"), r.get("context"), r.get("seed"))
            if r.get("model") == inputs["model"] and key in refs and (wanted is None or r["method"] in wanted):
                scores[(f"kvshrink `{r['method']}`", r["context"])][(r["task"], r["seed"])] = r["metrics"][r["task"]]
    if not any(label == args.reference for label, _ in scores):
        ap.error(f"no row is labelled {args.reference!r}; rows: {sorted({label for label, _ in scores})}")
    tasks = [t for t in TASKS if any(t == task for v in scores.values() for task, _ in v)]
    head = ["row", "context", *tasks, "avg [95% interval]", f"vs {args.reference}, points [95% interval]", "prompts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, context), cells in sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        keys = prompt_order(cells)
        by_task: dict[str, list[float]] = defaultdict(list)
        for task, seed in keys:
            by_task[task].append(cells[(task, seed)])
        means = {t: sum(v) / len(v) for t, v in by_task.items()}
        avg = sum(means.values()) / len(means)
        lo, hi = interval([cells[k] for k in keys], resamples(len(keys)))
        full = scores.get((args.reference, context), {})
        paired = [k for k in keys if k in full]
        ref: dict[str, list[float]] = defaultdict(list)
        for task, seed in paired:
            ref[task].append(full[(task, seed)])
        delta = ""
        if paired:
            d = avg - sum(sum(v) / len(v) for v in ref.values()) / len(ref)
            dlo, dhi = interval([cells[k] - full[k] for k in paired], resamples(len(paired)))
            delta = f"{100 * d:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
        row = [f"{means[t]:.2f}" if t in means else "" for t in tasks]
        lines.append("| " + " | ".join([label, str(context), *row, f"{avg:.3f} [{lo:.3f}, {hi:.3f}]", delta,
                                        str(len(keys))]) + " |")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
