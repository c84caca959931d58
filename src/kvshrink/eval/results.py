"""Tables and plots of evaluation records: quality against bytes, one row or point per method setting."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..io import temp_beside
from ..report import markdown_table
from ..spec import label
from .tasks import columns


def _columns() -> dict[str, tuple[str, str, bool]]:
    return {key: (title, fmt, higher) for key, title, fmt, higher, _ in columns()}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, context): metrics averaged over seeds, bytes from the records' memory reports, and
    `method_seconds`, a cell's mean wall time less the prefill it shared with the other methods, plus the KVzip
    pass it took from another cell (`reconstruction.reused`)."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple] = []
    for r in records:
        key = (r["method"], r["context"])
        if key not in groups:
            order.append(key)
        g = groups[key]
        for metric in _columns():
            if metric in r["metrics"] and r["metrics"][metric] is not None:
                g[metric].append(float(r["metrics"][metric]))
        g["ratio"].append(r["memory"]["ratio"])
        passed = r.get("reconstruction") or {}  # a KVzip pass reused from another cell is still this method's cost
        g["method_seconds"].append(r["seconds"] - r.get("shared_prefill_seconds", 0.0)
                                   + (passed.get("seconds", 0.0) if passed.get("reused") else 0.0))
        g["bytes_per_token"].append(r["memory"]["bytes_per_token"])
        g["seeds"].append(r["seed"])
    rows = []
    for method, context in order:
        g = groups[(method, context)]
        row = {"method": method, "context": context, "seeds": len(set(g["seeds"]))}
        for metric, values in g.items():
            if metric != "seeds" and values:
                row[metric] = sum(values) / len(values)
        rows.append(row)
    return rows


def results_table(records: Sequence[dict[str, Any]]) -> str:
    rows = summarize(records)
    cols = _columns()
    metrics = [m for m in cols if any(m in r for r in rows)]
    headers = ["method", "context", "ratio", "B/token"] + [cols[m][0] for m in metrics] + ["s/cell", "seeds"]
    body = []
    for r in rows:
        body.append([f"`{r['method']}`", r["context"], f"{r['ratio']:.3f}", f"{r['bytes_per_token']:.0f}"]
                    + [cols[m][1].format(r[m]) if m in r else "" for m in metrics]
                    + [f"{r['method_seconds']:.1f}", r["seeds"]])
    return markdown_table(headers, body)


def plot_results(records: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """PNG: one panel per quality metric against bytes per token, a point per method setting, `full` marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'kvshrink[plot]'") from None
    rows = summarize(records)
    cols = _columns()
    metrics = [key for key, *_, plotted in columns() if plotted and any(key in r for r in rows)]
    if not metrics:
        raise ValueError("no quality metric in the records to plot")
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    markers = "os^Dv<>p"
    for ax, metric in zip(axes[0], metrics):
        for ci, context in enumerate(contexts):
            pts = [r for r in rows if r["context"] == context and metric in r]
            for r in pts:
                is_full = r["method"].split(":")[0] == "full"
                ax.scatter(r["bytes_per_token"], r[metric], marker="*" if is_full else markers[ci % len(markers)],
                           s=160 if is_full else 40, color="black" if is_full else f"C{ci}",
                           label=f"context {context}" if r is pts[0] and len(contexts) > 1 else None, zorder=3)
                ax.annotate(label(r["method"]), (r["bytes_per_token"], r[metric]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
                if is_full:
                    ax.axhline(r[metric], color="grey", lw=0.8, ls="--", zorder=1)
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per token")
        ax.set_ylabel(cols[metric][0] + (" (higher is better)" if cols[metric][2] else " (lower is better)"))
        ax.grid(alpha=0.3)
        if len(contexts) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title or "quality against cache bytes (★ = full cache)")
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | Path, dpi: int = 130) -> Path:
    """Write a matplotlib figure to `path` atomically (a temporary file renamed onto it) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
