"""The network of a trained-model file (`nativelm.formats.trained_model`), ready for export or evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nativelm.formats import trained_model
from nativelm.model.bitlinear import set_weight_bits
from nativelm.model.transformer import NativeLM, build_model


def load_trained_model(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[NativeLM, dict[str, Any]]:
    """Rebuild the NativeLM of a trained-model file; returns (model in eval mode, the file's other fields)."""
    file = trained_model.read(path, map_location)
    model = build_model(file.model_params, file.vocab_size)
    model.load_state_dict(file.state_dict)
    if file.model_params.quantize and "weight_bits" in file.info:  # a full-precision model has no weight width
        set_weight_bits(model, float(file.info["weight_bits"]))
    model.eval()
    return model, file.info
