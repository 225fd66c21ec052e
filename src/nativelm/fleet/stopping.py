"""Stopping a rollout cleanly: SIGTERM is handled like Ctrl-C.

Inside `stopping()`, the first SIGTERM or SIGINT raises `Interrupted` in the main thread (where the
rollout waits for its boards), so every `finally` on the way out runs: the rollout sets its stop
event, each board's job stops at its next step (an upload at its next chunk) and unlocks the
board, the result log is finished with outcome "interrupted" and the summary printed. Further
signals while that happens are noted, not raised, so the clean-up is not cut short. The CLI then
exits 128 + the signal (130 for SIGINT, 143 for SIGTERM). SIGKILL cannot be handled: the next
rollout sees the lock's dead holder and takes it over (fleet/holder.py).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
WAKE_S = 0.2  # the main thread wakes this often while it waits for boards, to run a pending signal handler


class Interrupted(KeyboardInterrupt):
    """A signal stopped the operation; `exit_code` is the shell's 128 + signal, `result` what finished."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.result: Any = None
        super().__init__(f"interrupted by {self.signal_name}")


def interrupted_by(exc: BaseException) -> str:
    """How an exception that stopped a rollout is named in its log ("SIGTERM", "SIGINT", or its type)."""
    if isinstance(exc, Interrupted):
        return exc.signal_name
    return "SIGINT" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__


@contextlib.contextmanager
def stopping() -> Iterator[threading.Event]:
    """Raise `Interrupted` on the first SIGTERM/SIGINT within the block; the event is set by every signal.

    Outside the main thread (where signal handlers cannot be installed) the block runs as it is.
    """
    seen = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        first = not seen.is_set()
        seen.set()
        if first:
            raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    before = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield seen
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


def block_signals_here() -> None:
    """Keep SIGTERM/SIGINT off this (worker) thread and the threads it starts (SSH transports).

    The kernel hands a process's signal to any thread that does not block it; Python runs the
    handler only in the main thread, and only once that thread runs again. A signal that went to a
    board thread would leave the main thread asleep in its wait until the wave ended (this was why
    an interrupt test passed alone and hung behind other tests): board threads block them, and the
    main thread's waits wake every WAKE_S (`wait_all`).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def wait_all(futures: Sequence[Future[T]]) -> list[T]:
    """The futures' results in order, waiting in WAKE_S slices so a signal handler runs promptly."""
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=WAKE_S)
    return [future.result() for future in futures]


@dataclass
class Stop:
    """How a `stopped_cleanly` block ended: `exit_code` None when no signal stopped it."""

    exit_code: int | None = None


@contextlib.contextmanager
def stopped_cleanly(what: str) -> Iterator[Stop]:
    """`stopping()` for a CLI command: a signal ends the block with one line on stderr and its exit code
    (the rollout has released its locks, finished its log and printed its summary by then)."""
    stop = Stop()
    try:
        with stopping():
            yield stop
    except Interrupted as exc:
        log = getattr(exc.result, "log_path", None)
        print(f"{what}: interrupted by {exc.signal_name}: boards unlocked"
              + (f", result log finished: {log}" if log else ""), file=sys.stderr)
        stop.exit_code = exc.exit_code
