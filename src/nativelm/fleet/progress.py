"""Per-board progress of a rollout: one live bar per board on a terminal, plain lines otherwise.

Plain lines (logs, CI) look like ``board-2  upload  model.onnx 50%``: one per phase, and uploads
at every quarter, so a log of a 16-board rollout stays readable. Calls come from the rollout's
worker threads; everything is serialised by one lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from tqdm import tqdm

from nativelm.fleet.board_job import BoardResult, DeployHooks

UPLOAD_STEPS = 4  # plain-line mode: report an upload at 25%, 50%, 75%, 100%
BAR_WIDTH = 20  # terminal mode: characters of each board's bar


class Progress:
    """Shows what each board is doing; `hooks` plugs it into a deploy."""

    def __init__(self, boards: Sequence[str], stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.width = max((len(b) for b in boards), default=8)
        self._lock = threading.Lock()
        self._reported: dict[tuple[str, str], int] = {}  # (board, file) -> quarters already printed
        self._bars: dict[str, tqdm] = {}
        if self.live:
            for position, board in enumerate(boards):
                self._bars[board] = tqdm(total=100, position=position, file=self.stream, leave=True,
                                         bar_format="{desc}")
                self._show(board, 0, "waiting")

    def _line(self, board: str, phase: str, detail: str) -> None:
        print(f"{board.ljust(self.width)}  {phase:<14} {detail}".rstrip(), file=self.stream, flush=True)

    def _show(self, board: str, percent: int, text: str) -> None:
        """Redraw a board's live line: name, a 20-character bar, what it is doing."""
        filled = percent * BAR_WIDTH // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self._bars[board].set_description_str(f"{board.ljust(self.width)}  [{bar}]  {text}", refresh=True)

    def phase(self, board: str, phase: str, detail: str = "") -> None:
        with self._lock:
            if board in self._bars:
                self._show(board, 0, f"{phase} {detail}".strip())
            else:
                self._line(board, phase, detail)

    def upload(self, board: str, file: str, sent: int, total: int) -> None:
        percent = 100 if total <= 0 else min(100, int(sent * 100 / total))
        with self._lock:
            if board in self._bars:
                self._show(board, percent, f"upload {file} {percent}%")
                return
            quarter = percent * UPLOAD_STEPS // 100
            if quarter > self._reported.get((board, file), 0):
                self._reported[(board, file)] = quarter
                self._line(board, "upload", f"{file} {percent}%")

    def done(self, result: BoardResult) -> None:
        text = result.outcome if not result.reason else f"{result.outcome}: {result.phase}: {result.reason}"
        with self._lock:
            if result.board in self._bars:
                self._show(result.board, 100 if result.outcome in ("updated", "unchanged", "rolled-back") else 0, text)
            else:
                self._line(result.board, "done", text)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()

    def hooks(self, user: DeployHooks | None = None) -> DeployHooks:
        """Deploy hooks that report here and still call the caller's own hooks (tests inject faults there)."""
        user = user or DeployHooks()

        def on_phase(board: str, phase: str, detail: str) -> None:
            self.phase(board, phase, detail)
            if user.on_phase:
                user.on_phase(board, phase, detail)

        def on_progress(board: str, file: str, sent: int, total: int) -> None:
            self.upload(board, file, sent, total)
            if user.on_progress:
                user.on_progress(board, file, sent, total)

        return DeployHooks(on_phase=on_phase, on_progress=on_progress, after_upload=user.after_upload,
                           before_activate=user.before_activate)
