"""Generic background processes: start detached with a log and a pid file, check, wait, stop.

Nothing here knows about MLflow or Prefect (the same code runs one sshd per simulated board). The
record ``<name>.json`` keeps the psutil ``create_time`` so a pid the kernel recycled for another
program is never taken for ours, let alone signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import psutil

from nativelm.errors import NativelmError
from nativelm.fsutil import atomic_write_text
from nativelm.stack.hostio import (LOG_TAIL_LINES, describe_pid, file_lock, format_tail, http_ok, port_in_use,
                                    port_owner, tail_lines)

__all__ = ["LOG_TAIL_LINES", "BackgroundProcess", "ProcState", "ProcessRecord", "ProcessStatus", "ReadyResult",
           "describe_pid", "exit_code", "failure_message", "file_lock", "format_tail", "http_ok", "pid_alive",
           "port_in_use", "port_owner", "stop_processes", "tail_lines", "wait_http", "wait_ready"]

_LOG_ROTATE_BYTES = 8 << 20
_CTIME_SLACK_S = 0.005  # under one clock tick: create times come in whole ticks
_START_MARK = "--- nativelm "  # first line written to the log at each start

# Children started by this interpreter: polling them reaps them, so a dead child is not kept
# as a zombie (which would still answer os.kill(pid, 0)) and its exit code is known.
_CHILDREN: dict[int, subprocess.Popen] = {}
_EXIT_CODES: dict[int, int] = {}


class ProcState(str, Enum):
    """What a pid file says once checked against the live process table."""

    RUNNING = "running"  # the recorded process is alive and is the one we started
    STOPPED = "stopped"  # no pid file
    DEAD = "dead"  # pid file present, but that process is gone (or the pid now belongs to another program)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProcessRecord:
    """How a background process was started (the contents of ``<name>.json``)."""

    pid: int
    create_time: float | None  # None: unverifiable (record missing or bad), never taken for ours
    argv: tuple[str, ...]
    cwd: str | None
    started_at: float  # epoch seconds
    meta: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessStatus:
    """A checked pid file."""

    name: str
    state: ProcState
    pid: int | None
    record: ProcessRecord | None
    log_path: Path
    detail: str = ""  # one line: why it is dead, what is left of it
    leftovers: tuple[int, ...] = ()  # live processes of its session after the leader died (ours)


@dataclass(frozen=True)
class ReadyResult:
    """Outcome of waiting for one started process to answer over HTTP."""

    name: str
    ok: bool
    reason: str  # "ready" | "exited" | "timeout"
    seconds: float
    url: str
    exit_code: int | None = None


# --------------------------------------------------------------------------------------------
# process table helpers


def _process(pid: int) -> psutil.Process | None:
    """The live (non-zombie) process `pid`, or None."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return psutil.Process(pid)


def process_create_time(pid: int) -> float | None:
    """When `pid` was created (epoch seconds): two processes that had the same pid differ here."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(recorded: float | None, now: float | None) -> bool:
    """True if two create times (psutil, whole clock ticks after boot) name one process."""
    return recorded is not None and now is not None and abs(recorded - now) < _CTIME_SLACK_S


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (zombies count as dead; our own dead children are reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        code = child.poll()
        if code is not None:
            _CHILDREN.pop(pid, None)
            _EXIT_CODES[pid] = code
            return False
    return _process(pid) is not None


def exit_code(pid: int) -> int | None:
    """Exit status of a child this interpreter started and saw die (negative: killed by that signal)."""
    pid_alive(pid)
    return _EXIT_CODES.get(pid)


def session_members(sid: int) -> list[int]:
    """Live processes whose session or process group is `sid` (the leader itself included if alive)."""
    members: list[int] = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if sid in (os.getsid(pid), os.getpgid(pid)) and _process(pid) is not None:
                members.append(pid)
    return sorted(members)


# --------------------------------------------------------------------------------------------
# the managed process


class BackgroundProcess:
    """One named background process with its pid file, record and log in `state_dir`."""

    def __init__(self, name: str, state_dir: Path | str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
            raise ValueError(f"invalid process name {name!r}")
        self.name = name
        self.state_dir = Path(state_dir)
        self.pid_path = self.state_dir / f"{name}.pid"
        self.record_path = self.state_dir / f"{name}.json"
        self.log_path = self.state_dir / f"{name}.log"

    def __repr__(self) -> str:
        return f"BackgroundProcess({self.name!r}, {str(self.state_dir)!r})"

    # ---- reading state

    def record(self) -> ProcessRecord | None:
        """The pid file and its record; None without a pid file. A missing record makes the pid unverifiable."""
        try:
            text = self.pid_path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            text = ""
        try:
            pid = int(text)
        except ValueError:
            return ProcessRecord(pid=0, create_time=None, argv=(), cwd=None, started_at=0.0)
        try:
            raw = json.loads(self.record_path.read_text())
            if int(raw["pid"]) != pid:
                raise ValueError("record is for another pid")
            return ProcessRecord(pid=pid, create_time=float(raw["create_time"]), argv=tuple(raw.get("argv", ())),
                                 cwd=raw.get("cwd"), started_at=float(raw.get("started_at", 0.0)),
                                 meta=dict(raw.get("meta", {})))
        except (OSError, ValueError, KeyError, TypeError):
            return ProcessRecord(pid=pid, create_time=None, argv=(), cwd=None, started_at=0.0)

    def status(self) -> ProcessStatus:
        """Check the pid file against the process table: running, stopped or dead (and why)."""
        rec = self.record()
        if rec is None:
            return ProcessStatus(self.name, ProcState.STOPPED, None, None, self.log_path)
        if rec.pid <= 0:
            return ProcessStatus(self.name, ProcState.DEAD, None, rec, self.log_path,
                                 detail=f"pid file {self.pid_path} is unreadable")
        if pid_alive(rec.pid):
            if same_process(rec.create_time, process_create_time(rec.pid)):
                return ProcessStatus(self.name, ProcState.RUNNING, rec.pid, rec, self.log_path)
            why = ("now belongs to another program" if rec.create_time is not None
                   else f"is alive but cannot be verified as ours ({self.record_path} missing or bad)")
            return ProcessStatus(self.name, ProcState.DEAD, rec.pid, rec, self.log_path,
                                 detail=f"process {rec.pid} is gone (pid {rec.pid} {why}; left alone)")
        code = exit_code(rec.pid)
        detail = f"process {rec.pid} is gone" + (f" (exit code {code})" if code is not None else "")
        leftovers: tuple[int, ...] = ()
        if rec.create_time is not None:
            # While any process still belongs to session `pid`, the kernel cannot hand that pid to
            # a new process, so whatever is left of the session is ours.
            leftovers = tuple(session_members(rec.pid))
        if leftovers:
            detail += (f"; {len(leftovers)} leftover process{'es' if len(leftovers) > 1 else ''} of it still "
                       f"running (pid {', '.join(map(str, leftovers))})")
        return ProcessStatus(self.name, ProcState.DEAD, rec.pid, rec, self.log_path, detail, leftovers)

    def is_running(self) -> bool:
        """True if the recorded process is alive and is the one we started."""
        return self.status().state is ProcState.RUNNING

    def log_tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
        """The last lines of this process's log, from its latest start only."""
        lines = tail_lines(self.log_path, 400)
        starts = [i for i, line in enumerate(lines) if line.startswith(_START_MARK)]
        if starts:
            lines = lines[starts[-1] + 1 :]
        return lines[-n:]

    # ---- changing state

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, inherit_env: bool = True,
              cwd: Path | str | None = None, meta: Mapping[str, object] | None = None) -> ProcessRecord:
        """Start `argv` detached (own session, stdin closed, output appended to the log); write the pid file.

        `env` is added to a copy of this process's environment (or is the whole environment when
        `inherit_env` is False). Raises NativelmError if it is already running or cannot be started.
        """
        current = self.status()
        if current.state is ProcState.RUNNING:
            raise NativelmError(f"{self.name} is already running (pid {current.pid}); stop it first")
        argv = [str(a) for a in argv]
        full_env = {**(os.environ if inherit_env else {}), **(env or {})}
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._rotate_log()
            log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise NativelmError(f"cannot start {self.name}: cannot write {self.log_path}: {exc.strerror}") from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with log:
            log.write(f"{_START_MARK}{stamp}: starting {self.name}: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=cwd, env=full_env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise NativelmError(f"cannot start {self.name}: {argv[0]}: {exc.strerror or exc}") from None
        _CHILDREN[child.pid] = child
        _EXIT_CODES.pop(child.pid, None)
        rec = ProcessRecord(pid=child.pid, create_time=process_create_time(child.pid), argv=tuple(argv),
                            cwd=None if cwd is None else str(cwd), started_at=time.time(), meta=dict(meta or {}))
        atomic_write_text(self.record_path, json.dumps({
            "pid": rec.pid, "create_time": rec.create_time, "argv": list(rec.argv), "cwd": rec.cwd,
            "started_at": rec.started_at, "meta": rec.meta}, indent=2) + "\n")
        atomic_write_text(self.pid_path, f"{rec.pid}\n")
        return rec

    def stop(self, timeout_s: float = 15.0) -> str:
        """Stop it (SIGTERM to its whole process group, SIGKILL after `timeout_s`); see stop_processes."""
        return stop_processes([self], timeout_s)[self.name]

    def clear(self) -> None:
        """Forget the process: remove the pid file and its record (the log stays)."""
        for path in (self.pid_path, self.record_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))


# --------------------------------------------------------------------------------------------
# stopping and waiting, several processes at once


def _tree(pid: int, running: bool, leftovers: Sequence[int]) -> list[psutil.Process]:
    """The leader (when it is ours and alive), all its descendants, and what is left of its session."""
    procs: dict[int, psutil.Process] = {}
    if running and (leader := _process(pid)) is not None:
        procs[pid] = leader
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in leader.children(recursive=True)})
    for member in (*leftovers, *session_members(pid)):
        if member not in procs and (proc := _process(member)) is not None:
            procs[member] = proc
    return list(procs.values())


def _signal(procs: Sequence[psutil.Process], kill: bool) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill() if kill else proc.terminate()  # psutil checks the pid is still that process


def _alive(procs: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still alive after waiting up to `timeout_s` (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return [p for p in alive if _process(p.pid) is not None]


def stop_processes(procs: Sequence[BackgroundProcess], timeout_s: float = 15.0) -> dict[str, str]:
    """Stop several background processes in parallel; return name -> outcome.

    Outcomes: "stopped" (exited after SIGTERM), "killed" (needed SIGKILL), "not running"
    (no pid file), "stale" (pid file of a process already gone: removed). Only processes proven
    ours are signalled: the recorded leader with a matching create_time, its descendants and its
    session, or what is left of that session after the leader died.
    Raises NativelmError if something survives SIGKILL.
    """
    outcomes: dict[str, str] = {}
    targets: dict[str, tuple[BackgroundProcess, list[psutil.Process]]] = {}
    for proc in procs:
        st = proc.status()
        if st.state is ProcState.STOPPED:
            outcomes[proc.name] = "not running"
        elif st.state is ProcState.RUNNING or st.leftovers:
            assert st.pid is not None
            targets[proc.name] = (proc, _tree(st.pid, st.state is ProcState.RUNNING, st.leftovers))
        else:
            proc.clear()
            outcomes[proc.name] = "stale"
    everyone = [p for _, tree in targets.values() for p in tree]
    _signal(everyone, kill=False)
    left = {p.pid for p in _alive(everyone, timeout_s)}
    stubborn = [p for p in everyone if p.pid in left]
    _signal(stubborn, kill=True)
    survivors = {p.pid for p in _alive(stubborn, 10.0)} if stubborn else set()
    failed: list[str] = []
    for name, (proc, tree) in targets.items():
        pids = {p.pid for p in tree}
        for pid in pids:
            pid_alive(pid)  # reap our own children
        if pids & survivors:
            failed.append(f"{name}: {', '.join(describe_pid(p) for p in sorted(pids & survivors))}")
            continue
        proc.clear()
        outcomes[name] = "killed" if pids & left else "stopped"
    if failed:
        raise NativelmError(f"processes survived SIGKILL: {'; '.join(failed)}")
    return {proc.name: outcomes[proc.name] for proc in procs}


def wait_ready(targets: Sequence[tuple[BackgroundProcess, str]], timeout_s: float,
               poll_s: float = 0.25) -> list[ReadyResult]:
    """Wait, for all targets at once, until each process answers 2xx at its URL, dies, or time runs out."""
    started = time.monotonic()
    deadline = started + timeout_s
    pending = {proc.name: (proc, url) for proc, url in targets}
    results: dict[str, ReadyResult] = {}
    while pending:
        for name, (proc, url) in list(pending.items()):
            st = proc.status()
            elapsed = time.monotonic() - started
            if st.state is not ProcState.RUNNING:
                code = exit_code(st.pid) if st.pid else None
                results[name] = ReadyResult(name, False, "exited", elapsed, url, code)
            elif http_ok(url, timeout_s=max(0.5, min(2.0, deadline - time.monotonic()))):
                results[name] = ReadyResult(name, True, "ready", elapsed, url)
            elif time.monotonic() >= deadline:
                results[name] = ReadyResult(name, False, "timeout", elapsed, url)
            else:
                continue
            del pending[name]
        if pending:
            time.sleep(poll_s)
    return [results[proc.name] for proc, _ in targets]


def wait_http(proc: BackgroundProcess, url: str, timeout_s: float) -> float:
    """Wait until `proc` answers at `url`; return the seconds it took. On death or timeout raise
    NativelmError naming the log and quoting its last lines (the process is left as it is)."""
    result = wait_ready([(proc, url)], timeout_s)[0]
    if not result.ok:
        raise NativelmError(failure_message(proc, result))
    return result.seconds


def failure_message(proc: BackgroundProcess, result: ReadyResult, note: str = "") -> str:
    """One line saying what went wrong (plus `note`), then the last lines of the process's log, indented."""
    if result.reason == "exited":
        code = f" (exit code {result.exit_code})" if result.exit_code is not None else ""
        head = f"{proc.name} exited during start{code}"
    else:
        head = f"{proc.name} did not answer at {result.url} within {result.seconds:.0f} s"
    if note:
        head += f" ({note})"
    tail = proc.log_tail()
    where = f"; log {proc.log_path}" + (", last lines:" if tail else " (no output)")
    return head + where + ("\n" + format_tail(tail) if tail else "")
