"""The study's charts: validation curves, and perplexity against bytes and against decode speed.

On the Pareto charts each method (fp, native, ptq) has its own colour and its frontier drawn: the
rows no other row of the method beats on both axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from nativelm.plotting import figure
from nativelm.study.report import RowSummary

CURVES_PNG = "curves.png"
PARETO_BYTES_PNG = "pareto_bytes.png"
PARETO_DECODE_PNG = "pareto_decode.png"
COLOURS = {"fp": "tab:blue", "native": "tab:red", "ptq": "tab:green"}


def frontier(points: Sequence[tuple[float, float]], more_is_better: bool) -> list[tuple[float, float]]:
    """The (x, ppl) points no other point beats on both: lower ppl and smaller x (or larger, if better)."""
    ordered = sorted(points, key=lambda p: (-p[0] if more_is_better else p[0], p[1]))
    kept: list[tuple[float, float]] = []
    for point in ordered:
        if not kept or point[1] < kept[-1][1]:
            kept.append(point)
    return kept


def plot_curves(summaries: Sequence[RowSummary], path: Path) -> Path:
    with figure(path, figsize=(8, 4.8)) as (_, ax):
        for i, s in enumerate(summaries):
            for j, curve in enumerate(s.curves):
                if curve:
                    steps, losses = zip(*curve, strict=True)
                    ax.plot(steps, losses, "o-", ms=2.5, lw=1.2, color=f"C{i % 10}", alpha=1.0 if j == 0 else 0.5,
                            label=f"{s.row} (lr {s.lr:g})" if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (PyTorch, nats / token)")
        ax.set_title("validation loss of every row at its best learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return path


def _pareto(summaries: Sequence[RowSummary], path: Path, x_of: Callable[[RowSummary], float], xlabel: str,
            more_is_better: bool) -> Path:
    with figure(path, figsize=(7.5, 4.8)) as (_, ax):
        for method, colour in COLOURS.items():
            mine = [s for s in summaries if s.method == method]
            if not mine:
                continue
            points = [(x_of(s), s.ppl_onnx.mean) for s in mine]
            ax.scatter(*zip(*points, strict=True), color=colour, label=method, zorder=3)
            for s, (x, y) in zip(mine, points, strict=True):
                ax.annotate(s.row, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
            edge = frontier(points, more_is_better)
            ax.plot(*zip(*edge, strict=True), color=colour, lw=1.0, alpha=0.7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ONNX validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return path


def write_charts(summaries: Sequence[RowSummary], folder: Path) -> list[Path]:
    return [plot_curves(summaries, folder / CURVES_PNG),
            _pareto(summaries, folder / PARETO_BYTES_PNG, lambda s: s.file_bytes / 1e6, "model file (MB)", False),
            _pareto(summaries, folder / PARETO_DECODE_PNG, lambda s: s.decode_tokens_per_s.mean,
                    "CPU decode (tokens/s)", True)]
