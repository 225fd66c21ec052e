"""The trained-model file (`train` writes it, `export` reads it): weights + model section + vocabulary size.

A torch file (``weights_only`` loadable) holding ``format``, ``format_version``, ``model_params``
(the resolved `model` section), ``vocab_size``, ``state_dict`` and provenance fields (step,
weight_bits, train_fingerprint, seed, tokenizer_sha256, val_loss). Building the network from it
is `nativelm.model.trained.load_trained_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nativelm.errors import NativelmError
from nativelm.formats import envelope
from nativelm.fsutil import atomic_open
from nativelm.params.model import ModelParams

FORMAT = "nativelm-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainedModelFile:
    """The content of a trained-model file, validated."""

    model_params: ModelParams
    vocab_size: int
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]  # every other field: format, step, weight_bits, provenance ...


def load_torch(path: Path, what: str, map_location: str | torch.device = "cpu", missing_hint: str = "") -> Any:
    """A torch file of tensors only (no arbitrary pickles); any failure to read it is one clear line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise NativelmError(f"{path}: {what} not found{f' ({missing_hint})' if missing_hint else ''}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise NativelmError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def write(path: Path, state_dict: dict[str, torch.Tensor], model_params: ModelParams, vocab_size: int,
          info: dict[str, Any]) -> Path:
    """Write the file atomically (a crash leaves the previous model file as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_params": model_params.model_dump(mode="json"),
            "vocab_size": int(vocab_size), "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            **info}
    with atomic_open(path) as handle:
        torch.save(data, handle)
    return path


def read(path: Path | str, map_location: str | torch.device = "cpu") -> TrainedModelFile:
    """Read and validate a trained-model file; anything wrong is one NativelmError line naming the file."""
    path = Path(path)
    data = load_torch(path, "model file", map_location, "run `nativelm train` first")
    envelope.checked(data, path, FORMAT, FORMAT_VERSION, "nativelm model file")
    try:
        params = ModelParams.model_validate(data["model_params"])
        vocab_size = int(data["vocab_size"])
        state = data["state_dict"]
    except Exception as exc:  # noqa: BLE001 - pydantic, KeyError, TypeError: all mean a damaged file
        raise NativelmError(f"{path}: damaged model file ({type(exc).__name__}: {str(exc)[:200]})") from None
    info = {k: v for k, v in data.items() if k not in ("state_dict", "model_params", "vocab_size")}
    info["model_params"] = data["model_params"]
    info["vocab_size"] = vocab_size
    return TrainedModelFile(params, vocab_size, state, info)
