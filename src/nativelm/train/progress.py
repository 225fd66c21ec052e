"""The training progress bar: a live bar on a terminal, one line per redraw anywhere else."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class NoBar:
    """The bar of a run that shows none (progress off, or a rank other than the first)."""

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class LinePerUpdate:
    """Where the bar draws when stderr is no terminal (a CI log, a file, a pipe): each redraw its own line.

    tqdm redraws in place with a carriage return, which a log file keeps as one endless line.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def training_bar(total: int, initial: int, shown: bool) -> Any:
    """The bar of `total` steps starting at `initial` on stderr (a NoBar when not `shown`)."""
    if not shown:
        return NoBar()
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="train", unit="step",
                file=sys.stderr if interactive else LinePerUpdate(sys.stderr), dynamic_ncols=interactive,
                ncols=None if interactive else 100, mininterval=0.5 if interactive else 10.0, smoothing=0.1)
