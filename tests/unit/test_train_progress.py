"""The training bar in a log: one line per redraw when stderr is no terminal, never carriage returns."""

from __future__ import annotations

import io
import sys

import pytest

from nativelm.train.progress import training_bar


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_the_bar_writes_one_line_per_update_when_stderr_is_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Pipe()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = training_bar(4, 0, True)
    bar.mininterval = 0
    for step in range(4):
        bar.update(1)
        bar.set_postfix(loss=5.0 - step)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 4 and all(line.startswith("train:") and "%|" in line for line in lines), lines
    assert "4/4" in lines[-1] and "loss=2" in lines[-1]
