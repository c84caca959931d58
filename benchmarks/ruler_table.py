"""Markdown table of RULER-style eval records, every row scored on the same prompts.

    .venv/bin/python benchmarks/ruler_table.py benchmarks/results/eval-ruler-qwen.jsonl --context 4096 \
        --methods "full,kivi:bits=2,tada:profile=benchmarks/profiles/qwen2.5-coder-1.5b-tada-rotate-0.20.json"

A prompt is one (task, seed) at the given context. By default the table keeps the prompts that every listed method
answered (so a run that was stopped part-way is compared on equal ground, and the count says how many); with
`--all-prompts` each row uses every prompt it has and the `prompts` column shows where they differ. Columns: share
of a 16-bit cache (mean over the prompts), per-task means of the task's score, their average ("RULER avg"), the
difference to `full` in points (100 x the average) when `full` is a row, the mean seconds per prompt after the
prompt's shared prefill (which the eval charges to whichever method ran first; it is the same for every row), and
the number of prompts.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvshrink.eval.ruler import TASKS


def load(path: Path, context: int, model: str | None) -> dict[str, dict[tuple[str, int], dict]]:
    """method -> (task, seed) -> record, for one context (the last record wins when a cell was run twice)."""
    out: dict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not JSON ({e})") from None
        if r.get("context") != context or r.get("task") not in TASKS or (model and r.get("model") != model):
            continue
        out[r["method"]][(r["task"], r["seed"])] = r
    return out


def short(method: str) -> str:
    """`tada:profile=…tada-rotate-0.20` for a profile path; other specs as they are."""
    name, _, opts = method.partition(":")
    if name == "tada" and opts.startswith("profile=") and "," not in opts:
        stem = Path(opts[len("profile="):]).name.removesuffix(".json")
        return f"tada:profile=…{stem[stem.find('tada'):] if 'tada' in stem else stem}"
    return method


def table(by_method: dict[str, dict[tuple[str, int], dict]], methods: list[str], all_prompts: bool) -> str:
    missing = [m for m in methods if m not in by_method]
    if missing:
        have = ", ".join(sorted(by_method)) or "none"
        raise SystemExit(f"no records at this context for {missing}; methods with records: {have}")
    common = set.intersection(*(set(by_method[m]) for m in methods))
    if not all_prompts and not common:
        raise SystemExit("the listed methods share no prompt; use --all-prompts or fewer methods")
    tasks = [t for t in TASKS if any(t == task for m in methods for task, _ in by_method[m])]
    rows = []
    for m in methods:
        cells = {k: r for k, r in by_method[m].items() if all_prompts or k in common}
        per_task: dict[str, list[float]] = defaultdict(list)
        for (task, _), r in cells.items():
            per_task[task].append(r["metrics"][task])
        means = {t: sum(v) / len(v) for t, v in per_task.items()}
        share = sum(r["memory"]["ratio"] for r in cells.values()) / len(cells)
        seconds = sum(r["seconds"] - (r.get("shared_prefill_seconds") or 0.0) for r in cells.values()) / len(cells)
        rows.append((m, share, means, sum(means.values()) / len(means), seconds, len(cells)))
    full = next((avg for m, _, _, avg, _, _ in rows if m == "full"), None)
    head = ["setting", "share", *tasks, "RULER avg", *(["vs full (points)"] if full is not None else []),
            "s/prompt after prefill", "prompts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, share, means, avg, seconds, n in rows:
        cells = [f"{means[t]:.2f}" if t in means else "" for t in tasks]
        delta = [f"{100 * (avg - full):+.1f}"] if full is not None else []
        lines.append("| " + " | ".join([f"`{short(m)}`", f"{share:.3f}", *cells, f"{avg:.3f}", *delta,
                                        f"{seconds:.1f}", str(n)]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--methods", help="comma-separated method specs, in row order (default: every method recorded)")
    ap.add_argument("--model", help="keep only this model's records")
    ap.add_argument("--all-prompts", action="store_true", help="each row on every prompt it has")
    args = ap.parse_args()
    by_method = load(args.records, args.context, args.model)
    if args.methods:
        from kvshrink.eval.runner import split_specs
        methods = split_specs(args.methods)
    else:
        methods = list(by_method)
    print(table(by_method, methods, args.all_prompts))


if __name__ == "__main__":
    main()
