"""Final PNGs of a training run: the loss curve and the expert-load heatmap (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nativelm.plotting import figure


def plot_loss_curve(history: Sequence[Mapping[str, float]], path: Path | str,
                    reference: Mapping[str, float] | None = None, title: str = "training loss") -> Path:
    """Train loss (and CE part) and validation loss against the step; dashed lines for `reference`
    values (e.g. the unigram cross-entropy the model must beat)."""
    with figure(path, figsize=(7, 4.2)) as (_, ax):
        _draw_loss(ax, history, reference, title)
    return Path(path)


def _draw_loss(ax, history: Sequence[Mapping[str, float]], reference: Mapping[str, float] | None, title: str) -> None:
    train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    ce = [(h["step"], h["train/ce_loss"]) for h in history if "train/ce_loss" in h]
    val = [(h["step"], h["val/loss"]) for h in history if "val/loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (CE + aux)", color="tab:blue", lw=1.2)
    if ce:
        ax.plot(*zip(*ce, strict=True), label="train CE", color="tab:cyan", lw=0.8, alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="tab:orange", lw=1.5, ms=3)
    for i, (name, value) in enumerate((reference or {}).items()):
        ax.axhline(value, ls="--", lw=0.9, color=f"C{i + 3}", label=f"{name} ({value:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_expert_load(load: np.ndarray | Sequence[Sequence[float]], path: Path | str,
                     title: str = "expert load (share of routed tokens)") -> Path:
    """Heatmap of a (layers x experts) matrix of each expert's share of its layer's assignments."""
    matrix = np.asarray(load, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        matrix = np.zeros((1, 1))
    n_layers, n_experts = matrix.shape
    with figure(path, figsize=(max(4.0, 0.35 * n_experts + 2), max(2.5, 0.4 * n_layers + 1.5))) as (fig, ax):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="share")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers))
        ax.set_title(f"{title}; uniform = {1 / max(n_experts, 1):.3f}", fontsize=9)
    return Path(path)
