"""A trained-model file loads back into the same network, at every precision it was trained in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nativelm.errors import NativelmError
from nativelm.formats import trained_model
from nativelm.model import build_model
from nativelm.model.trained import load_trained_model
from nativelm.params.model import ModelParams

SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16, "window": 8,
         "n_experts": 2, "expert_ffn": 16, "top_k": 1}


@pytest.mark.parametrize(("quantize", "bits"), [(True, 1.58), (True, 4.0), (False, 32.0)])
def test_a_saved_model_loads_back_with_its_weight_width(tmp_path: Path, quantize: bool, bits: float) -> None:
    params = ModelParams(**SMALL, quantize=quantize)
    model = build_model(params, 64, seed=0).eval()
    # the train stage records model.bits, which is 32 for a full-precision model
    path = trained_model.write(tmp_path / "model.pt", model.state_dict(), params, 64, {"weight_bits": bits})
    loaded, info = load_trained_model(path)
    assert info["weight_bits"] == bits and loaded.params == params
    ids = torch.arange(8)[None]
    if quantize and bits != 1.58:
        model_bits = [m.weight_bits for m in loaded.modules() if hasattr(m, "weight_bits")]
        assert model_bits and all(b == bits for b in model_bits)
    else:
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_damaged_model_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(NativelmError, match="unreadable model file") as info:
        load_trained_model(tmp_path / "junk.pt")
    assert "\n" not in str(info.value)
