"""Side-by-side table of kvshrink's eviction methods and kvpress's presses of the same names, same inputs.

    python3 benchmarks/peers/kvpress/compare.py   # reads results-kvpress.jsonl and ../../results/eval-eviction.jsonl

Prints a markdown table (no third-party imports needed).
"""
from __future__ import annotations

import sys
from pathlib import Path

from jsonl import records

HERE = Path(__file__).parent
OURS = HERE.parent.parent / "results" / "eval-eviction.jsonl"
THEIRS = HERE / "results-kvpress.jsonl"
NAMES = ("full", "streamingllm", "h2o", "snapkv", "tova")
BUDGETS = (0.5, 0.25)
CONTEXTS = (2048, 4096)


def load_ours() -> dict:
    out = {}
    for r in records(OURS):
        name, _, opts = r["method"].partition(":")
        if name == "full" and not opts:
            budget = 1.0
        elif name in NAMES and opts.startswith("budget=") and "," not in opts:  # plain eviction, nothing else set
            budget = float(opts.split("=")[1])
        else:
            continue
        m = r["metrics"]
        value = m["kl"] if r["task"] == "kl" else f"{m['correct']}/{m['prompts']}"
        out[(name, budget, r["task"], r["context"])] = value
    return out


def load_theirs() -> dict:
    out = {}
    for r in records(THEIRS):
        value = r["kl"] if r["task"] == "kl" else f"{r['correct']}/{r['prompts']}"
        out[(r["press"], r["budget"], r["task"], r["context"])] = value
    return out


def fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(ours: dict, theirs: dict) -> str:
    head = ["method", "budget"] + [f"{task} {c // 1024}k (kvshrink / kvpress)" for task in ("KL", "passkey")
                                   for c in CONTEXTS]
    rows = []
    for name in NAMES:
        for budget in ((1.0,) if name == "full" else BUDGETS):
            cells = [f"`{name}`", f"{budget:g}"]
            for task in ("kl", "passkey"):
                for c in CONTEXTS:
                    key = (name, budget, task, c)
                    cells.append(f"{fmt(ours.get(key))} / {fmt(theirs.get(key))}")
            rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in (OURS, THEIRS):
        if not path.exists():
            sys.exit(f"{path} is missing: run kvshrink's eval and run_kvpress.py first (see README.md here)")
    print(table(load_ours(), load_theirs()))
