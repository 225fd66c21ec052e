"""The `train` stage: training loop, schedules, optimizers, checkpoints, distributed launch.

`run_train(params, logger)` runs the stage; `load_trained_model(path)` reads its model file
back (for export and evaluation). Imports are lazy so loading parameters stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nativelm.lazy import lazy_getattr

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
__getattr__ = lazy_getattr(__name__, _EXPORTS)
