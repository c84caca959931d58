"""Report of `chat20` records (KV-Direct's 20-turn conversation): memory against turn per method, and token match by
cache budget.

    python benchmarks/conversation_report.py benchmarks/results/conversation-smollm2.jsonl \
        --plot benchmarks/results/conversation-smollm2.png

Prints a markdown table (one row per method family, one column per budget in tokens, token match averaged over
the 20 turns; bytes held after the last turn and the largest per-turn peak resident memory above the process's
level before the conversation beside it) and draws two panels: cache bytes after each turn and that peak memory
during each turn.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("task") == "chat20"]
    if not records:
        raise SystemExit(f"{path}: no chat20 records")
    return records


def family(method: str) -> tuple[str, int | None]:
    """('h2o', 128) for 'h2o:tokens=128'; window-only is streamingllm without sinks; budgets from tokens=/window=."""
    name, _, opts = method.partition(":")
    options = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    budget = options.get("tokens") or (options.get("window") if name == "kvdirect" else None)
    if name == "streamingllm" and options.get("sinks") == "0":
        name = "window"
    if name == "kvdirect":
        name = f"kvdirect ({options.get('scheme', 'layer')})"
    rest = {k: v for k, v in options.items() if k not in ("tokens", "sinks", "window", "scheme")}
    if rest and not name.startswith(("kvdirect", "window", "streamingllm")):
        name += ":" + ",".join(f"{k}={v}" for k, v in sorted(rest.items()))
    return name, int(budget) if budget else None


def table(records: list[dict]) -> str:
    cells: dict[str, dict] = defaultdict(dict)
    extra: dict[str, tuple[float, float]] = {}
    budgets = sorted({b for r in records if (b := family(r["method"])[1]) is not None})
    largest: dict[str, float] = {}
    for r in records:
        name, budget = family(r["method"])
        cells[name][budget] = r["metrics"]["match"]
        rank = float("inf") if budget is None else budget
        if rank >= largest.get(name, -1):  # bytes and peak of the family's largest budget (or unbudgeted run)
            largest[name] = rank
            extra[name] = (r["metrics"]["final_cache_bytes"] / 2**20,
                           r["metrics"].get("peak_above_start_mib", r["metrics"]["peak_mib"]))
    head = ["method"] + [f"{b} tok" for b in budgets] + ["unbudgeted", "bytes at turn 20 (MiB)*", "peak MiB above start*"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(cells, key=lambda n: (n != "full", n)):
        row = cells[name]
        vals = [f"{row[b]:.3f}" if b in row else "" for b in budgets]
        vals.append(f"{row[None]:.3f}" if None in row else "")
        mib, peak = extra.get(name, (float("nan"), float("nan")))
        lines.append("| " + " | ".join([f"`{name}`"] + vals + [f"{mib:.2f}", f"{peak:.0f}"]) + " |")
    lines.append("\n\\* at the family's largest budget (or without one)")
    return "\n".join(lines)


def details(records: list[dict]) -> str:
    """One row per record: token match, bytes after the last turn, the largest per-turn peak above the start, and
    seconds per reply step (mean over the 20 turns, weighted by reply length)."""
    lines = ["| method | match | bytes at turn 20 (MiB) | peak MiB above start | s/step |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["method"] != "full", r["method"])):
        m, turns = r["metrics"], r["metrics"]["turns"]
        steps = sum(t["reply_tokens"] for t in turns)
        per_step = sum(t["seconds_per_step"] * t["reply_tokens"] for t in turns) / steps
        peak = m.get("peak_above_start_mib", m["peak_mib"])
        lines.append(f"| `{r['method']}` | {m['match']:.3f} | {m['final_cache_bytes'] / 2**20:.2f} | {peak:.0f} | "
                     f"{per_step:.3f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvshrink.eval.results import save_png

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in sorted(records, key=lambda r: r["method"]):
        turns = r["metrics"]["turns"]
        x = [t["turn"] for t in turns]
        label = re.sub(r"^streamingllm:sinks=0,", "window:", r["method"])
        style = "-" if r["method"].startswith(("full", "kvdirect")) else ":"
        ax1.plot(x, [t["cache_bytes"] / 2**20 for t in turns], style, label=label, lw=1.2)
        ax2.plot(x, [t.get("peak_above_start", t["peak_rss"]) / 2**20 for t in turns], style, label=label, lw=1.2)
    ax1.set(xlabel="turn", ylabel="cache bytes held (MiB)", title="cache after each turn")
    ax2.set(xlabel="turn", ylabel="MiB above the process before the conversation",
            title="peak memory during each turn")
    ax1.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    records = load(args.records)
    print(table(records))
    print()
    print(details(records))
    if args.plot:
        models = sorted({r["model"] for r in records})
        plot(records, args.plot, f"20-turn conversation, {', '.join(models)}")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
