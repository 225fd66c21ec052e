"""Atomic training checkpoints with everything an exact resume needs.

A checkpoint is one file ``step_NNNNNNN.pt`` (torch.save, loaded back with
``weights_only=True``) holding the model and optimizer state, the fp16 loss scaler, the number
of completed steps, the RNG states of torch (CPU and CUDA), numpy and Python, the batch
sampler's state (the same on every rank) and the process count, the metric history (for the final loss curve) and a fingerprint of the
settings that shape the trajectory. It is written to a temporary file in the same folder,
fsynced and renamed, then the ``latest`` pointer file is replaced the same way; older
checkpoints beyond ``keep`` are removed afterwards. A kill at any moment leaves either the
previous or the new checkpoint complete, never a half-written one under a final name.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nativelm.formats import envelope
from nativelm.formats.trained_model import load_torch
from nativelm.fsutil import atomic_open, atomic_write_text

FORMAT = "nativelm-train-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU + every CUDA device), numpy's global generator and Python's `random`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # written on a machine with more devices: those there are
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(folder: Path | str, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write `payload` as the checkpoint of `step` atomically, point `latest` at it, prune old ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **payload}
    with atomic_open(path) as handle:
        torch.save(data, handle)
    atomic_write_text(folder / LATEST, path.name + "\n")
    _fsync_dir(folder)
    prune_checkpoints(folder, keep, protect=path.name)
    return path


def list_checkpoints(folder: Path | str) -> list[Path]:
    """Complete checkpoint files of a folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int, protect: str | None = None) -> None:
    """Remove all but the `keep` newest checkpoints (and stale temporary files)."""
    for stale in folder.glob(".step_*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    files = list_checkpoints(folder)
    for old in files[: max(0, len(files) - keep)]:
        if old.name != protect:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def latest_checkpoint(folder: Path | str) -> Path | None:
    """The checkpoint named by `latest`, else the newest complete one, else None."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text(encoding="utf-8").strip()
        if _NAME.match(named.name) and named.is_file():
            return named
    files = list_checkpoints(folder)
    return files[-1] if files else None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint on CPU (tensors only, no arbitrary pickles); one clear line if it is not one."""
    path = Path(path)
    return envelope.checked(load_torch(path, "checkpoint"), path, FORMAT, FORMAT_VERSION,
                            "nativelm training checkpoint")


def clear_checkpoints(folder: Path | str) -> None:
    """Remove every checkpoint and the `latest` pointer (a fresh start)."""
    folder = Path(folder)
    for path in list_checkpoints(folder):
        path.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / LATEST).unlink()
