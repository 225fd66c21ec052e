"""`nativelm stack up | down | status`: the local MLflow + Prefect servers as background processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nativelm.errors import NativelmError
from nativelm.stack.process import (
    BackgroundProcess,
    ProcState,
    ReadyResult,
    failure_message,
    file_lock,
    format_tail,
    http_ok,
    port_in_use,
    port_owner,
    stop_processes,
    wait_ready,
)
from nativelm.stack.services import (
    Service,
    check_executable,
    service,
    services,
    stack_dir,
    stack_params,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nativelm.stack.services import AnyParams


@dataclass(frozen=True)
class ServiceStatus:
    """One server as `up`, `down` or `status` left it."""

    name: str  # "mlflow" | "prefect"
    state: ProcState  # running / stopped / dead (compares equal to those strings)
    pid: int | None
    url: str
    log_path: Path
    healthy: bool = False  # answered its health URL (GET /health, GET /api/health)
    action: str | None = None  # what up/down did: started, restarted, already running, stopped, killed,
    #                            not running, stale pid file removed; None for status
    detail: str = ""  # one line: why it is dead, why it was restarted
    log_tail: tuple[str, ...] = ()  # last log lines when it was found dead
    seconds: float | None = None  # how long it took to answer, when up started it


def _proc(params: AnyParams, svc: Service) -> BackgroundProcess:
    return BackgroundProcess(svc.name, stack_dir(params))


def _lock(params: AnyParams):
    return file_lock(stack_dir(params) / ".lock")


def _port_taken_line(svc: Service) -> str:
    owner = port_owner(svc.port)
    by = f"another program ({owner})" if owner else "another program"
    return (f"{svc.name}: port {svc.port} on {svc.host} is already in use by {by}; "
            f"stop it or choose another {svc.port_param} in params.yaml")


def _check(svc: Service, proc: BackgroundProcess) -> ServiceStatus:
    st = proc.status()
    healthy = st.state is ProcState.RUNNING and http_ok(svc.health_url)
    tail = tuple(proc.log_tail()) if st.state is ProcState.DEAD else ()
    detail = st.detail
    if st.state is ProcState.RUNNING and st.record and st.record.argv and tuple(st.record.argv) != svc.argv:
        detail = "started with other settings than params.yaml now gives (run `nativelm stack up` to restart it)"
    elif st.state is ProcState.RUNNING and not healthy:
        detail = f"not answering at {svc.health_url}"
    return ServiceStatus(svc.name, st.state, st.pid, svc.url, proc.log_path, healthy, None, detail, tail)


def status(params: AnyParams) -> list[ServiceStatus]:
    """State of each server: running (and whether it answers HTTP), stopped, or dead (why, last log lines)."""
    return [_check(svc, _proc(params, svc)) for svc in services(params)]


def is_running(params: AnyParams, name: str) -> bool:
    """True if our server `name` ("mlflow" or "prefect") is alive and answers its health URL."""
    svc = service(params, name)
    return _proc(params, svc).is_running() and http_ok(svc.health_url)


def up(params: AnyParams) -> list[ServiceStatus]:
    """Start whatever is not running, in parallel, and wait until both answer over HTTP.

    Idempotent: a healthy server is left alone ("already running"). A dead one (pid file but no
    process, or leftovers of it) is cleaned up and started again, its death reported with the
    last lines of its log. A port held by a program that is not ours stops `up` before anything
    starts, with one line per taken port. A server that exits during start, or does not answer
    within `stack.start_timeout_s` (it is then stopped), raises NativelmError with its log's tail.
    """
    sp = stack_params(params)
    svcs = services(params)
    with _lock(params):
        procs = {svc.name: _proc(params, svc) for svc in svcs}
        report: dict[str, ServiceStatus] = {}
        notes: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> (action, detail, tail)
        to_start: list[Service] = []
        to_wait: list[Service] = []  # ours, alive, not answering yet (e.g. still migrating)
        for svc in svcs:
            proc = procs[svc.name]
            st = proc.status()
            if st.state is ProcState.RUNNING:
                if st.record is not None and st.record.argv and tuple(st.record.argv) != svc.argv:
                    proc.stop(sp.stop_timeout_s)
                    notes[svc.name] = ("restarted", "it ran with other settings than params.yaml now gives", ())
                    to_start.append(svc)
                elif http_ok(svc.health_url):
                    report[svc.name] = ServiceStatus(svc.name, ProcState.RUNNING, st.pid, svc.url, proc.log_path,
                                                     True, "already running")
                else:
                    to_wait.append(svc)
            else:
                if st.state is ProcState.DEAD:
                    tail = tuple(proc.log_tail())
                    notes[svc.name] = ("restarted", f"was dead: {st.detail}", tail)
                    proc.stop(sp.stop_timeout_s)  # leftovers of it may still hold the port
                to_start.append(svc)

        taken = [_port_taken_line(svc) for svc in to_start if port_in_use(svc.host, svc.port)]
        if taken:
            raise NativelmError("\n".join(taken))
        for svc in to_start:
            check_executable(svc)
            try:
                svc.cwd.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise NativelmError(f"{svc.name}: cannot create its data folder {svc.cwd}: {exc.strerror}") from None

        for svc in to_start:
            procs[svc.name].start(svc.argv, env=svc.env, cwd=svc.cwd, meta={"url": svc.url})
        waiting = [*to_start, *to_wait]
        results: dict[str, ReadyResult] = {}
        if waiting:
            ready = wait_ready([(procs[svc.name], svc.health_url) for svc in waiting], sp.start_timeout_s)
            results = {r.name: r for r in ready}

        failures: list[str] = []
        for svc in waiting:
            proc, result = procs[svc.name], results[svc.name]
            if result.ok:
                action, detail, tail = notes.get(svc.name, ("started" if svc in to_start else "already running", "", ()))
                report[svc.name] = ServiceStatus(svc.name, ProcState.RUNNING, proc.status().pid, svc.url,
                                                 proc.log_path, True, action, detail, tail, result.seconds)
                continue
            note = ""
            if result.reason == "timeout" and svc in to_start:
                proc.stop(sp.stop_timeout_s)
                note = "stopped it; raise stack.start_timeout_s if it needs longer"
            elif result.reason == "timeout":
                note = f"it runs as pid {proc.status().pid}: `nativelm stack down` then `up` restarts it"
            failures.append(failure_message(proc, result, note))
        if failures:
            started = [s.name for s in report.values() if s.state is ProcState.RUNNING]
            if started:
                failures.append(f"(running: {', '.join(started)})")
            raise NativelmError("\n".join(failures))
        return [report[svc.name] for svc in svcs]


def down(params: AnyParams) -> list[ServiceStatus]:
    """Stop both servers (SIGTERM to each process group, SIGKILL after stack.stop_timeout_s) and
    remove their pid files. Idempotent: what is not running is reported as such."""
    sp = stack_params(params)
    svcs = services(params)
    with _lock(params):
        procs = [_proc(params, svc) for svc in svcs]
        before = {p.name: p.status() for p in procs}
        outcomes = stop_processes(procs, sp.stop_timeout_s)
    labels = {"stale": "stale pid file removed"}
    return [ServiceStatus(svc.name, ProcState.STOPPED, before[svc.name].pid, svc.url, proc.log_path, False,
                          labels.get(outcomes[svc.name], outcomes[svc.name]), before[svc.name].detail)
            for svc, proc in zip(svcs, procs)]


def _show_path(path: Path) -> str:
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def render(statuses: Iterable[ServiceStatus]) -> list[str]:
    """Text lines for the CLI: one line per server, then (indented) the last log lines of dead ones."""
    lines: list[str] = []
    for s in statuses:
        if s.action is not None:
            what = s.action + (f" in {s.seconds:.1f} s" if s.seconds is not None and s.action != "already running"
                               else "")
        else:
            what = str(s.state)
            if s.state is ProcState.RUNNING and not s.healthy:
                what += " (not answering)"
        pid = f"pid {s.pid}" if s.pid else "-"
        line = f"{s.name:<8} {what:<22} {pid:<10} {s.url:<24} log {_show_path(s.log_path)}"
        if s.detail:
            line += f"  ({s.detail})"
        lines.append(line)
        if s.log_tail:
            lines.append(f"    last lines of {_show_path(s.log_path)}:")
            lines.extend(format_tail(s.log_tail).splitlines())
    return lines

