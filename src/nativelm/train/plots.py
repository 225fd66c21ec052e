"""Final PNGs of a training run: the loss curve and the expert-load heatmap (matplotlib, Agg)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save through a temporary file and rename, so a half-written PNG is never left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_loss_curve(history: Sequence[Mapping[str, float]], path: Path | str,
                    reference: Mapping[str, float] | None = None, title: str = "training loss") -> Path:
    """Train loss (and CE part) and validation loss against the step; dashed lines for `reference`
    values (e.g. the unigram cross-entropy the model must beat)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
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
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_expert_load(load: np.ndarray | Sequence[Sequence[float]], path: Path | str,
                     title: str = "expert load (share of routed tokens)") -> Path:
    """Heatmap of a (layers x experts) matrix of each expert's share of its layer's assignments."""
    plt = _figure()
    matrix = np.asarray(load, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        matrix = np.zeros((1, 1))
    n_layers, n_experts = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n_experts + 2), max(2.5, 0.4 * n_layers + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers))
    ax.set_title(f"{title}; uniform = {1 / max(n_experts, 1):.3f}", fontsize=9)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
