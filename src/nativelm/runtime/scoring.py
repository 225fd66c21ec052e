"""Scoring text with a loaded model: per-token negative log-likelihood and perplexity (numpy only)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .session import Model


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood (float64) of `targets` under `logits` (positions, vocab)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return log_norm - z[np.arange(len(targets)), targets]


def window_nll(model: Model, windows: Iterable[np.ndarray]) -> np.ndarray:
    """NLL of every next token of each window (an empty KV cache per window, the whole window at once)."""
    scored = [token_nll(model.forward(np.asarray(row, dtype=np.int64)[None])[0][0][:-1], np.asarray(row)[1:])
              for row in windows]
    return np.concatenate(scored) if scored else np.zeros(0)
