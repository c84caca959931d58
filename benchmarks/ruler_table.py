"""Markdown table of RULER-style eval records, every row scored on the same prompts.

    .venv/bin/python benchmarks/ruler_table.py benchmarks/results/eval-ruler-qwen.jsonl --context 4096 \
        --methods "full,kivi:bits=2,tada:profile=benchmarks/profiles/qwen2.5-coder-1.5b-tada-rotate-0.20.json"

A prompt is one (task, seed) at the given context. By default the table keeps the prompts that every listed method
answered (so a run that was stopped part-way is compared on equal ground, and the count says how many); with
`--all-prompts` each row uses every prompt it has and the `prompts` column shows where they differ. Columns: share
of a 16-bit cache (mean over the prompts), per-task means of the task's score, their average ("RULER avg"), the
difference to `full` in points (100 x the average) when `full` is a row, the mean seconds per prompt after the
prompt's shared prefill (which the eval charges to whichever method ran first; it is the same for every row), and
the number of prompts. `--plot PATH` also draws the share against the average (a log share axis, one marker per
row, the legend naming each row and its average).

Intervals: beside each average and each difference, a 95% percentile interval from a bootstrap over the prompts:
2,000 resamples of the n prompts with replacement (the same resamples for every row, so differences are paired by
prompt), drawn by splitmix64 from `--seed` (0) as `next() % n`, prompts in task order (RULER's) then seed order;
the interval is the 51st and 1,950th of the 2,000 sorted resampled statistics. A difference is the mean over the
resampled prompts of (row's score - reference's score) on each prompt, the reference `full` or `--reference`.
With one prompt per task (11 prompts) one answer moves the average by up to 9 points, and the intervals say so.
`benchmarks/check_docs.py` recomputes these figures with its own code.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from kvshrink.spec import label as method_label
from kvshrink.eval.ruler import TASKS
from kvshrink.eval.runner import load_records
from kvshrink.spec import split_specs


def load(path: Path, context: int, model: str | None) -> dict[str, dict[tuple[str, int], dict]]:
    """method -> (task, seed) -> record, for one context (the last record wins when a cell was run twice); read by
    the eval's own loader (a line cut by an interrupted write is skipped with a warning)."""
    out: dict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
    for r in load_records(path):
        if r.get("context") == context and r.get("task") in TASKS and (not model or r.get("model") == model):
            out[r["method"]][(r["task"], r["seed"])] = r
    return out


RESAMPLES = 2000
MASK = (1 << 64) - 1


def splitmix64(seed: int):
    """Steele, Lea and Flood's splitmix64 stream: simple enough to reimplement exactly (check_docs.py does)."""
    state = seed & MASK
    while True:
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        yield z ^ (z >> 31)


def resamples(n: int, seed: int = 0, count: int = RESAMPLES) -> list[list[int]]:
    """`count` bootstrap resamples of n prompts: lists of n indices drawn with replacement."""
    stream = splitmix64(seed)
    return [[next(stream) % n for _ in range(n)] for _ in range(count)]


def interval(values: list[float], draws: list[list[int]]) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` over the resamples `draws`."""
    n = len(values)
    stats = sorted(sum(values[i] for i in idx) / n for idx in draws)
    cut = int(0.025 * len(stats))
    return stats[cut], stats[len(stats) - 1 - cut]


def prompt_order(keys) -> list[tuple[str, int]]:
    """(task, seed) prompts in RULER's task order, then by seed: the order the resamples index."""
    return sorted(keys, key=lambda k: (TASKS.index(k[0]), k[1]))


def table(by_method: dict[str, dict[tuple[str, int], dict]], methods: list[str], all_prompts: bool,
          reference: str = "full", seed: int = 0) -> tuple[str, list]:
    missing = [m for m in methods if m not in by_method]
    if missing:
        have = ", ".join(sorted(by_method)) or "none"
        raise SystemExit(f"no records at this context for {missing}; methods with records: {have}")
    common = set.intersection(*(set(by_method[m]) for m in methods))
    if not all_prompts and not common:
        raise SystemExit("the listed methods share no prompt; use --all-prompts or fewer methods")
    tasks = [t for t in TASKS if any(t == task for m in methods for task, _ in by_method[m])]
    ref = by_method.get(reference) if reference in methods else None
    rows = []
    for m in methods:
        cells = {k: r for k, r in by_method[m].items() if all_prompts or k in common}
        keys = prompt_order(cells)
        per_task: dict[str, list[float]] = defaultdict(list)
        for (task, _), r in cells.items():
            per_task[task].append(r["metrics"][task])
        means = {t: sum(v) / len(v) for t, v in per_task.items()}
        share = sum(r["memory"]["ratio"] for r in cells.values()) / len(cells)
        seconds = sum(r["seconds"] - (r.get("shared_prefill_seconds") or 0.0) for r in cells.values()) / len(cells)
        scores = [cells[k]["metrics"][k[0]] for k in keys]
        avg_ci = interval(scores, resamples(len(keys), seed))
        delta = None
        if ref is not None:
            paired = [k for k in keys if k in ref]
            diffs = [cells[k]["metrics"][k[0]] - ref[k]["metrics"][k[0]] for k in paired]
            avg = sum(means.values()) / len(means)
            ref_means: dict[str, list[float]] = defaultdict(list)
            for k in paired:
                ref_means[k[0]].append(ref[k]["metrics"][k[0]])
            ref_avg = sum(sum(v) / len(v) for v in ref_means.values()) / len(ref_means)
            delta = (avg - ref_avg, interval(diffs, resamples(len(paired), seed)))
        rows.append((m, share, means, sum(means.values()) / len(means), seconds, len(cells), avg_ci, delta))
    head = ["setting", "share", *tasks, "RULER avg [95% interval]",
            *([f"vs {method_label(reference)}, points [95% interval]"] if ref is not None else []),
            "s/prompt after prefill", "prompts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, share, means, avg, seconds, n, (lo, hi), delta in rows:
        cells = [f"{means[t]:.2f}" if t in means else "" for t in tasks]
        diff = [f"{100 * delta[0]:+.1f} [{100 * delta[1][0]:+.1f}, {100 * delta[1][1]:+.1f}]"] if delta else []
        lines.append("| " + " | ".join([f"`{method_label(m)}`", f"{share:.3f}", *cells,
                                        f"{avg:.3f} [{lo:.3f}, {hi:.3f}]", *diff, f"{seconds:.1f}", str(n)]) + " |")
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--methods", help="comma-separated method specs, in row order (default: every method recorded)")
    ap.add_argument("--model", help="keep only this model's records")
    ap.add_argument("--all-prompts", action="store_true", help="each row on every prompt it has")
    ap.add_argument("--reference", default="full", help="the row differences are taken against (default: full)")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default: 0)")
    ap.add_argument("--plot", help="also draw share against the average as a PNG at this path")
    ap.add_argument("--title", help="the plot's title")
    args = ap.parse_args()
    by_method = load(args.records, args.context, args.model)
    if args.methods:
        methods = split_specs(args.methods)
    else:
        methods = list(by_method)
    text, rows = table(by_method, methods, args.all_prompts, args.reference, args.seed)
    print(text)
    if args.plot:
        plot(rows, args.plot, args.title or f"RULER-style at {args.context} tokens ({rows[0][5]} prompts per row)")


def plot(rows: list, path: str, title: str) -> None:
    """Share of a 16-bit cache against the RULER average, one point per row (legend: setting and average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvshrink.eval.results import save_png

    labels = [f"{method_label(m)} ({avg:.3f})" for m, _, _, avg, *_ in rows]
    # the legend sits right of the axes: the figure widens with its longest label instead of squeezing the axes
    fig, ax = plt.subplots(figsize=(5.5 + 0.055 * max(map(len, labels)), max(4.8, 0.19 * len(rows) + 1.2)))
    markers = "osD^v<>pPhX"
    for i, (m, share, _, avg, *_) in enumerate(rows):
        full = m == "full"
        ax.scatter(share, avg, marker="*" if full else markers[i % len(markers)], s=170 if full else 42,
                   color="black" if full else plt.cm.tab20(i % 20), label=labels[i], zorder=3)
        if full:
            ax.axhline(avg, color="grey", lw=0.8, ls="--", zorder=1)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    shares = [share for _, share, *_ in rows]
    ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5) if min(shares) / 1.5 <= t <= max(shares) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("cache bytes as a share of a 16-bit cache")
    ax.set_ylabel("RULER-style average (higher is better)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
