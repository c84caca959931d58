"""Plain-text rendering of memory reports and result tables for the terminal and the README."""
from __future__ import annotations

from typing import Any, Sequence


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def memory_table(report: dict[str, Any], layers: bool = True) -> str:
    """A readable summary of `CompressedCache.memory_report()`: totals, parts, and (optionally) one row per layer."""
    ratio = report["ratio"]
    head = (
        f"cache: {format_bytes(report['nbytes'])} for {report['tokens']} tokens x batch {report['batch']}; "
        f"16-bit DynamicCache: {format_bytes(report['fp16_nbytes'])}; "
        f"ratio {ratio:.3f}" if ratio is not None else "cache: empty"
    )
    tp = report.get("tensor_parallel")
    if tp:
        start, stop = tp["kv_heads"]
        head += (f" (all {tp['size']} tensor-parallel ranks)" if tp["scope"] == "all ranks" else
                 f" (tensor-parallel rank {tp['rank']} of {tp['size']}: KV heads {start}-{stop - 1} of {tp['of']})")
    total = report["nbytes"] or 1
    parts = markdown_table(
        ["part", "bytes", "share"],
        [[p, format_bytes(n), f"{100 * n / total:.1f}%"] for p, n in report["by_part"].items() if n],
    )
    out = [head, "", parts]
    if layers:
        keys = [k for k in ("bits", "window", "sinks", "key", "value") if any(k in r for r in report["by_layer"])]
        rows = [
            [r["layer"], r["tokens"], format_bytes(r["nbytes"]), f"{r['ratio']:.3f}" if r["ratio"] else "-"]
            + [r.get(k, "") for k in keys]
            for r in report["by_layer"]
        ]
        out += ["", markdown_table(["layer", "tokens", "bytes", "ratio"] + keys, rows)]
    return "\n".join(out)
