"""The speed-quality frontier of whole-UNet methods: which rows no other row beats on both
time and error, and the figure that shows it (``benchmarks/frontier.py`` measures; the
notebook draws the same figure from the committed JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["dominated_by", "plot_frontier"]


def dominated_by(rows: Sequence[dict[str, Any]], error_key: str, time_key: str = "seconds") -> dict[str, list[str]]:
    """For every row's method, the methods that are both faster and more faithful."""
    return {
        row["method"]: [
            other["method"]
            for other in rows
            if other[time_key] < row[time_key] and other[error_key] < row[error_key]
        ]
        for row in rows
    }


def _short(method: str) -> str:
    """A plot label: the method without the settings every row of its kind shares."""
    for long, short in (
        ("max_downsample=2, ", ""),
        (", max_downsample=2", ""),
        (", merge_crossattn=True, merge_mlp=True", " +x-attn, MLP"),
        ("ratio=", ""),
        ("MaMe keys/values only", "K/V only"),
        ("ToDo K/V pooling", "ToDo"),
    ):
        method = method.replace(long, short)
    return method


def _family(method: str) -> str:
    for prefix in ("stock", "baseline", "tomesd", "ToDo", "MaMe keys/values only", "MaMe"):
        if method.startswith(prefix):
            return "stock" if prefix == "baseline" else prefix
    return "other"


_STYLE = {
    "stock": ("#555555", "s"),
    "tomesd": ("#ff7f0e", "o"),
    "ToDo": ("#2ca02c", "^"),
    "MaMe keys/values only": ("#9467bd", "D"),
    "MaMe": ("#1f77b4", "o"),
    "other": ("#8c564b", "x"),
}


def plot_frontier(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    panels: Sequence[tuple[str, str]],
    default: str,
    title: str,
) -> Path:
    """Error (log) against speed-up, one panel per ``(error key, panel title)``; the points no
    other point beats on both axes are joined, the ``default`` method is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.get("speedup") and not _family(row["method"]) == "stock"]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for axis, (key, panel_title) in zip(axes[0], panels):
        dominated = dominated_by(shown, key)
        for row in shown:
            colour, marker = _STYLE[_family(row["method"])]
            axis.scatter(row["speedup"], row[key], color=colour, marker=marker, s=46, zorder=3)
            label = _short(row["method"])
            axis.annotate(label, (row["speedup"], row[key]), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
            if row["method"] == default:
                axis.scatter(row["speedup"], row[key], s=260, facecolors="none", edgecolors="black", zorder=4)
        front = sorted((r for r in shown if not dominated[r["method"]]), key=lambda r: r["speedup"])
        axis.plot([r["speedup"] for r in front], [r[key] for r in front], color="black", lw=1, ls="--", zorder=2)
        axis.set_yscale("log")
        axis.set_xlabel("speed-up over stock (median of interleaved rounds)")
        axis.set_ylabel("noise-prediction error vs stock (relative L2)")
        axis.set_title(panel_title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, marker=m, ls="", label=name) for name, (c, m) in _STYLE.items() if name not in ("stock", "other")
    ]
    handles.append(plt.Line2D([], [], color="black", ls="--", label="frontier"))
    handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="black", markersize=12, label="default"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
