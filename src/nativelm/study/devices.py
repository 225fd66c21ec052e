"""`study.devices`: one cell per device at a time, so the study takes about as long as its slowest cells.

`on_devices([cuda:0, cuda:1])` runs the cells in threads of this process, one per device entry: a
cell takes a free device, trains there and hands it back when its rows are exported (one export at
a time, `Study.run_cell`). A CUDA device is bound to the worker thread (`torch.cuda.set_device` is
per thread), so the cell's training runs `train.device: cuda` on it; `cpu` entries train on the CPU,
two of them two cells at once. Results come back in the cells' order, as one after another
(docs/study.md).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nativelm.errors import ParamsError

OnResult = Callable[[dict[str, Any]], None]


def bind_device(device: str) -> str:
    """Make `device` (cpu | cuda:N) this thread's and return the train.device that trains on it."""
    if device == "cpu":
        return "cpu"
    import torch

    index = int(device.split(":", 1)[1])
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ParamsError(f"study.devices names {device} but {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return "cuda"


def on_devices(devices: Sequence[str]) -> Callable[[Any, OnResult], list[dict[str, Any]]]:
    """A study's cell map (`study.stage.CellMap`) running at most one cell per entry of `devices` at once."""

    def run_cells(runner: Any, on_result: OnResult) -> list[dict[str, Any]]:
        cells = runner.cells()
        free: queue.Queue[str] = queue.Queue()
        for device in devices:
            free.put(device)
        logged = threading.Lock()

        def report(result: dict[str, Any]) -> None:
            with logged:  # MLflow's nested runs are logged one at a time
                on_result(result)

        def one(number: int, cell: Any) -> list[dict[str, Any]]:
            device = free.get()
            try:
                return runner.run_cell(cell, report, f"[{number}/{len(cells)}] on {device}: ", device=device)
            finally:
                free.put(device)

        with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="study-device") as pool:
            futures = [pool.submit(one, number, cell) for number, cell in enumerate(cells, 1)]
            return [result for future in futures for result in future.result()]

    return run_cells
