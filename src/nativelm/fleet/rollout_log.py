"""The result log of a rollout: ``<stack.state_dir>/rollouts/<rollout id>.json``, rewritten atomically as
boards finish and marked finished at the end; a later rollout reads it to recognise a board lock left
behind by this one, and finishes the logs of rollouts whose controller died.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.holder import holder_state, parse_holder, this_holder
from nativelm.fleet.waves import skipped
from nativelm.fsutil import atomic_write_text
from nativelm.jsonfile import JsonFileError, read_json_file

if TYPE_CHECKING:
    from nativelm.fleet.waves import Wave

_ID = re.compile(r"^(rollout|rollback)-\d{8}-\d{6}-[0-9a-f]{6}$")


def new_rollout_id(kind: str = "rollout") -> str:
    """rollout-YYYYmmdd-HHMMSS-<6 hex>: sortable, unique, and safe as a board lock owner."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def rollouts_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "rollouts"


def log_finished(state_dir: Path, rollout_id: str) -> bool:
    """Whether `rollout_id` (e.g. a board lock's owner) is a rollout of this controller that has ended."""
    if not _ID.match(rollout_id):
        return False
    try:
        return bool(read_json_file(rollouts_dir(state_dir) / f"{rollout_id}.json").get("finished"))
    except (JsonFileError, AttributeError):
        return False


def finish_abandoned_logs(state_dir: Path, newest: int = 200) -> list[str]:
    """Finish the logs of rollouts whose controller died (SIGKILL, power cut) on this host: outcome "died".

    Run as a rollout starts; only the `newest` logs are read. Returns the ids finished.
    """
    done = []
    for path in sorted(rollouts_dir(state_dir).glob("*.json"))[-newest:]:
        try:
            log = read_json_file(path)
        except JsonFileError:
            continue
        holder = parse_holder(log.get("controller")) if isinstance(log, dict) and not log.get("finished") else None
        if holder is None:
            continue
        state = holder_state(holder)
        if state.dead:
            log.update(finished=True, outcome="died", aborted=f"the rollout died: {state.why}")
            atomic_write_text(path, json.dumps(log, indent=2) + "\n")
            done.append(str(log.get("id")))
    return done


def now_iso() -> str:
    """The time a rollout log records (UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RolloutResult:
    """A whole rollout (or rollback): every board's result, and why it stopped early if it did."""

    rollout_id: str
    kind: str  # "deploy" | "rollback"
    release: str
    version: int | None
    started_at: str
    boards: list[BoardResult] = field(default_factory=list)
    aborted: str | None = None
    seconds: float = 0.0
    finished: bool = False
    log_path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    outcome: str = "running"  # running | ok | failed | interrupted (| died: see finish_abandoned_logs)
    controller: str = field(default_factory=this_holder)  # HOST:PID:START_TIME of the process running it

    @property
    def failed(self) -> list[BoardResult]:
        return [r for r in self.boards if r.failed]

    @property
    def ok(self) -> bool:
        return not self.failed and self.aborted is None

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.boards:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "kind": self.kind, "release": self.release, "version": self.version,
                "started_at": self.started_at, "finished": self.finished, "outcome": self.outcome,
                "seconds": round(self.seconds, 3),
                "aborted": self.aborted, "counts": self.counts(), "settings": self.settings,
                "controller": self.controller,
                "boards": [r.to_json() for r in self.boards]}


class RolloutLog:
    """Keeps `<state_dir>/rollouts/<id>.json` current as boards finish (thread-safe, atomic writes)."""

    def __init__(self, state_dir: Path, result: RolloutResult) -> None:
        self.result = result
        self.path = rollouts_dir(state_dir) / f"{result.rollout_id}.json"
        result.log_path = self.path
        self._lock = threading.Lock()
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.result.to_json(), indent=2) + "\n")

    def record(self, board: BoardResult) -> None:
        with self._lock:
            self.result.boards.append(board)
            self.write()

    def finish(self, ordered: list[BoardResult], aborted: str | None, seconds: float,
               outcome: str | None = None) -> RolloutResult:
        with self._lock:
            self.result.boards, self.result.aborted = ordered, aborted
            self.result.seconds, self.result.finished = seconds, True
            self.result.outcome = outcome or ("ok" if self.result.ok else "failed")
            self.write()
        return self.result

    def finish_interrupted(self, waves: Sequence[Wave], why: str, seconds: float) -> RolloutResult:
        """Finish the log of a rollout stopped by `why` (a signal): the boards that ended as they ended,
        the others skipped."""
        with self._lock:
            done = {r.board: r for r in self.result.boards}
        aborted = f"interrupted by {why}"
        ordered = [done.get(b.name) or skipped(b, aborted) for wave in waves for b in wave.boards]
        return self.finish(ordered, aborted, seconds, "interrupted")
