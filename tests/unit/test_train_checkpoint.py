"""Checkpoints: atomic files, `latest` pointer, pruning, exact round trip of states and RNGs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nativelm.errors import NativelmError
from nativelm.train import checkpoint as ckpt


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_model_optimizer_and_every_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    sampler = np.random.Generator(np.random.PCG64(5))
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.capture_rng(),
               "samplers": [{"bit_generator": sampler.bit_generator.state}], "history": [{"step": 1.0}]}
    path = ckpt.save_checkpoint(tmp_path, 7, payload)
    expected, expected_sampler = _draws(), sampler.integers(0, 1000, 5).tolist()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    data = ckpt.load_checkpoint(path)
    assert data["step"] == 7 and data["history"] == [{"step": 1.0}]
    ckpt.restore_rng(data["rng"])
    other = np.random.Generator(np.random.PCG64(0))
    other.bit_generator.state = data["samplers"][0]["bit_generator"]
    assert _draws() == expected
    assert other.integers(0, 1000, 5).tolist() == expected_sampler
    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict(data["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    opt2.load_state_dict(data["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_latest_pointer_and_keep_last_n(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000030.pt", "step_0000040.pt"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000040.pt"
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000040.pt"
    assert not list(tmp_path.glob("*.tmp"))


def test_latest_falls_back_to_newest_file_and_ignores_temporaries(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 10, {"x": torch.tensor(1)})
    ckpt.save_checkpoint(tmp_path, 20, {"x": torch.tensor(2)})
    (tmp_path / ".step_0000030.pt.abc.tmp").write_bytes(b"half written")  # a kill mid-write
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000020.pt"
    (tmp_path / "latest").write_text("step_0000099.pt\n")  # points at nothing
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000020.pt"
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None


def test_unreadable_or_foreign_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(NativelmError, match="unreadable checkpoint"):
        ckpt.load_checkpoint(bad)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(NativelmError, match="not a nativelm training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")


def test_clear_checkpoints(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, {})
    ckpt.clear_checkpoints(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) is None and not (tmp_path / "latest").exists()
