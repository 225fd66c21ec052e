"""The `train` stage: training loop, schedules, optimizers, checkpoints, distributed launch.

`run_train(params, logger)` runs the stage; `load_trained_model(path)` reads its model file
back (for export and evaluation). Imports are lazy so loading parameters stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nativelm.train.params import TRAIN_PRESETS, ResolvedTrain, TrainParams
    from nativelm.train.stage import TrainResult, effective_model_params, load_trained_model, run_train

_EXPORTS = {
    "TRAIN_PRESETS": "nativelm.train.params",
    "ResolvedTrain": "nativelm.train.params",
    "TrainParams": "nativelm.train.params",
    "TrainResult": "nativelm.train.stage",
    "effective_model_params": "nativelm.train.stage",
    "load_trained_model": "nativelm.train.stage",
    "run_train": "nativelm.train.stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the public names on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
