"""`nativelm run` shows a flow run's log lines once each; a stage's progress bar is live on a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

from nativelm.orchestration.loop import _Echo

LINES = ["Running stage 'train':", "train:  10%|#  | 1/10 [00:01<00:09, loss=3.1]",
         "train:  20%|## | 2/10 [00:02<00:08, loss=3.0]", "train: done"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _show(out: io.StringIO, prefix: str = "") -> _Echo:
    echo = _Echo(out, prefix)
    for i, message in enumerate(LINES):
        echo.show(SimpleNamespace(id=i, task_run_id=None, message=message))
    echo.show(SimpleNamespace(id=1, task_run_id=None, message=LINES[1]))  # the same log again: shown once
    return echo


def test_a_pipe_gets_one_line_per_update() -> None:
    out = io.StringIO()
    echo = _show(out, "rollout: ")
    assert out.getvalue().splitlines() == [f"rollout: {line}" for line in LINES]
    assert echo.lines == [f"rollout: {line}" for line in LINES]


def test_a_terminal_redraws_the_bar_in_place() -> None:
    out = _Terminal()
    _show(out)
    text = out.getvalue()
    assert text.startswith(LINES[0] + "\n\r" + LINES[1])
    assert f"\r{LINES[2]}\x1b[K\n{LINES[3]}\n" in text and text.count("\n") == 3


def test_task_state_noise_is_dropped() -> None:
    out = io.StringIO()
    _Echo(out, "").show(SimpleNamespace(id=9, task_run_id="t", message="Finished in state Completed()"))
    assert out.getvalue() == ""
