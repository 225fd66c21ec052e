"""study.devices: at most one cell per device entry at a time, all entries busy together, results in the
cells' order; a device that is not there is one line."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from nativelm.errors import ParamsError
from nativelm.params.study import StudyParams
from nativelm.study.devices import bind_device, on_devices


class TimedCells:
    """A study's runner reduced to what on_devices calls: `cells()` and a `run_cell` that takes 0.2 s and
    records where and when it ran (the real runner trains and exports: tests/integration/test_study_devices.py)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.spans: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()

    def cells(self) -> list[int]:
        return list(range(self.n))

    def run_cell(self, cell: int, on_result: Any, label: str, device: str) -> list[dict[str, Any]]:
        start = time.monotonic()
        time.sleep(0.2)
        with self.lock:
            self.spans.append((device, start, time.monotonic()))
        on_result({"cell": cell})
        return [{"cell": cell, "device": device, "label": label}]


def _overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_cells_run_one_per_device_at_a_time_and_come_back_in_order() -> None:
    runner, seen = TimedCells(5), []
    started = time.monotonic()
    results = on_devices(["cpu", "cuda:0", "cuda:1"])(runner, seen.append)
    wall = time.monotonic() - started
    assert [r["cell"] for r in results] == list(range(5)) and sorted(r["cell"] for r in seen) == list(range(5))
    assert all(r["label"].endswith(f"on {r['device']}: ") for r in results)
    spans = runner.spans
    assert not any(_overlap(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] == b[0])
    assert {d for d, _, _ in spans} == {"cpu", "cuda:0", "cuda:1"}
    assert wall < 0.2 * 5 * 0.7  # two rounds of three at once, not five one after another


def test_a_device_named_twice_takes_two_cells() -> None:
    runner = TimedCells(2)
    on_devices(["cpu", "cpu"])(runner, lambda result: None)
    assert _overlap(*runner.spans)


def test_devices_that_are_not_there_or_malformed_are_one_line() -> None:
    assert bind_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match=r"^study\.devices names cuda:3 but 0 CUDA device\(s\) are visible$"):
            bind_device("cuda:3")
    with pytest.raises(ParamsError, match="study.*devices"):
        StudyParams().with_overrides({"devices": ["gpu0"]}, "study")
    assert StudyParams().with_overrides({"devices": ["cuda:0", "cuda:1"]}, "study").devices == ["cuda:0", "cuda:1"]
