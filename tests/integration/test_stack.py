"""The local stack with real servers: MLflow and Prefect started, used, killed, restarted, stopped.

One stack per module (starting it costs seconds); the tests that change its state run last and
call `up` first, so each one also holds when run alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nativelm import stack
from nativelm.errors import NativelmError
from nativelm.params.stack import StackParams
from nativelm.stack.process import BackgroundProcess, ProcState, pid_alive, port_in_use, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, data: bytes | None = None) -> object:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - loopback test server
        return json.loads(reply.read())


def by_name(statuses: list[stack.ServiceStatus]) -> dict[str, stack.ServiceStatus]:
    return {s.name: s for s in statuses}


def wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def env_no_telemetry() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DO_NOT_TRACK", "true")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, env_no_telemetry: None) -> Iterator[dict]:
    """A real stack on free loopback ports with its state in a temporary folder; stopped at the end."""
    state = tmp_path_factory.mktemp("stack-state")
    params = StackParams(state_dir=str(state), mlflow_port=free_port(), prefect_port=free_port(),
                         start_timeout_s=240.0)
    started = time.monotonic()
    statuses = stack.up(params)
    seconds = time.monotonic() - started
    print(f"\ncold `stack up` took {seconds:.1f} s: "
          + ", ".join(f"{s.name} answered after {s.seconds:.1f} s" for s in statuses))
    try:
        yield {"params": params, "state": state, "up": statuses}
    finally:
        stack.down(params)


# ---------------------------------------------------------------------------------------------
# with the servers running


def test_up_starts_both_servers_with_state_under_the_state_folder(running: dict) -> None:
    params, state = running["params"], running["state"]
    statuses = by_name(running["up"])
    assert list(statuses) == ["mlflow", "prefect"]
    for name, s in statuses.items():
        assert s.action == "started" and s.state == "running" and s.healthy and s.pid
        assert (state / "stack" / f"{name}.pid").read_text().strip() == str(s.pid)
        assert s.log_path == state / "stack" / f"{name}.log" and s.log_path.is_file()
    assert statuses["mlflow"].url == stack.mlflow_url(params) == f"http://127.0.0.1:{params.mlflow_port}"
    assert statuses["prefect"].url == stack.prefect_ui_url(params) == f"http://127.0.0.1:{params.prefect_port}"
    assert (state / "mlflow" / "mlflow.db").is_file()
    assert (state / "prefect" / "prefect.db").is_file()  # PREFECT_HOME under the state folder
    lines = stack.render(running["up"])
    assert len(lines) == 2 and lines[0].startswith("mlflow") and "started" in lines[0]


def test_mlflow_records_runs_and_serves_artifacts(running: dict, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url(running["params"]))
    experiment_id = client.create_experiment("stack-test")
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(experiment_id, run_name="first")
    for step, value in enumerate([3.0, 2.5, 2.25]):
        client.log_metric(run.info.run_id, "loss", value, step=step)
    client.log_param(run.info.run_id, "lr", "0.001")
    report = tmp_path / "report.txt"
    report.write_text("perplexity 12.5\n")
    client.log_artifact(run.info.run_id, str(report), artifact_path="eval")
    client.set_terminated(run.info.run_id)

    again = client.get_run(run.info.run_id)
    assert again.data.metrics["loss"] == 2.25 and again.data.params["lr"] == "0.001"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.5, 2.25]
    assert again.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/report.txt"]
    local = client.download_artifacts(run.info.run_id, "eval/report.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "perplexity 12.5\n"
    # uploaded through the server into the artifact store under the state folder
    stored = list((running["state"] / "mlflow" / "artifacts").rglob("report.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "perplexity 12.5\n"


def test_prefect_runs_a_flow_and_serves_it_back(running: dict, tmp_path: Path) -> None:
    params = running["params"]
    api = stack.prefect_api_url(params)
    assert api == f"http://127.0.0.1:{params.prefect_port}/api"
    assert get_json(f"{api}/health") is True
    script = textwrap.dedent("""
        from prefect import flow, task
        from prefect.runtime import flow_run

        @task
        def double(x: int) -> int:
            return 2 * x

        @flow(name="stack-smoke")
        def smoke(x: int) -> str:
            assert double(x) == 2 * x
            return flow_run.id

        print("FLOW_RUN", smoke(21))
    """)
    env = {**os.environ, **stack.client_env(params), "PREFECT_HOME": str(tmp_path / "client-home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    flow_run_id = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("FLOW_RUN"))
    run = get_json(f"{api}/flow_runs/{flow_run_id}")
    assert run["state_type"] == "COMPLETED" and run["parameters"] == {"x": 21}
    assert get_json(f"{api}/flows/{run['flow_id']}")["name"] == "stack-smoke"
    task_runs = get_json(f"{api}/task_runs/filter",
                         json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode())
    assert [t["state_type"] for t in task_runs] == ["COMPLETED"]


def test_status_and_helpers_describe_the_running_stack(running: dict) -> None:
    params = running["params"]
    statuses = by_name(stack.status(params))
    for name, s in statuses.items():
        assert s.state == "running" and s.healthy and s.action is None and s.pid == by_name(running["up"])[name].pid
        assert stack.is_running(params, name)
    lines = stack.render(statuses.values())
    assert "running" in lines[0] and stack.mlflow_url(params) in lines[0] and "mlflow.log" in lines[0]
    assert stack.prefect_ui_url(params) in lines[1]
    env = stack.client_env(params)
    assert env["MLFLOW_TRACKING_URI"] == stack.mlflow_url(params)
    assert env["PREFECT_API_URL"] == stack.prefect_api_url(params)
    with pytest.raises(NativelmError, match="unknown stack service"):
        stack.is_running(params, "postgres")


def test_up_again_leaves_running_servers_alone(running: dict) -> None:
    params = running["params"]
    before = {s.name: s.pid for s in stack.up(params)}  # (re)start if an earlier test left it down
    again = by_name(stack.up(params))
    assert {name: s.pid for name, s in again.items()} == before
    assert all(s.action == "already running" and s.healthy for s in again.values())


def test_a_port_taken_by_another_program_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        params = StackParams(state_dir=str(tmp_path / "state"), mlflow_port=port, prefect_port=free_port())
        with pytest.raises(NativelmError) as caught:
            stack.up(params)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("mlflow: ") and f"port {port} on 127.0.0.1 is already in use" in message
    assert "stack.mlflow_port" in message
    # nothing was started, not even the server whose port was free
    assert [s.state for s in stack.status(params)] == ["stopped", "stopped"]
    assert not list((tmp_path / "state" / "stack").glob("*.pid"))


def test_a_server_dying_during_start_is_reported_with_its_log(tmp_path: Path, env_no_telemetry: None) -> None:
    params = StackParams(state_dir=str(tmp_path / "state"), mlflow_port=free_port(), prefect_port=free_port(),
                         start_timeout_s=240.0)
    # a damaged Prefect database (MLflow, given a broken SQLite file, retries for ~100 s before it exits)
    (tmp_path / "state" / "prefect").mkdir(parents=True)
    (tmp_path / "state" / "prefect" / "prefect.db").write_bytes(b"not a database" * 512)
    try:
        with pytest.raises(NativelmError) as caught:
            stack.up(params)
        first, *rest = str(caught.value).splitlines()
        assert first.startswith("prefect exited during start (exit code ")
        assert f"log {tmp_path / 'state' / 'stack' / 'prefect.log'}, last lines:" in first
        assert rest and all(line.startswith("    | ") for line in rest[:-1])
        assert any("file is not a database" in line for line in rest)
        assert rest[-1] == "(running: mlflow)"
        statuses = by_name(stack.status(params))
        assert statuses["prefect"].state == "dead" and statuses["prefect"].log_tail
        assert statuses["mlflow"].state == "running"
    finally:
        stack.down(params)


def test_killed_mlflow_is_reported_dead_and_up_restarts_it(running: dict) -> None:
    from mlflow import MlflowClient

    params = running["params"]
    before = by_name(stack.up(params))
    client = MlflowClient(tracking_uri=stack.mlflow_url(params))
    experiment_id = client.create_experiment("survives-restart")

    os.kill(before["mlflow"].pid, signal.SIGKILL)
    wait_dead(before["mlflow"].pid)
    dead = by_name(stack.status(params))["mlflow"]
    assert dead.state == "dead" and dead.pid == before["mlflow"].pid and not dead.healthy
    assert f"process {before['mlflow'].pid} is gone" in dead.detail
    assert dead.log_tail  # the last lines of its log come with the report
    assert not stack.is_running(params, "mlflow") and stack.is_running(params, "prefect")
    lines = stack.render(stack.status(params))
    assert "dead" in lines[0] and any("last lines of" in line for line in lines)

    after = by_name(stack.up(params))
    assert after["mlflow"].action == "restarted" and "was dead" in after["mlflow"].detail
    assert after["mlflow"].log_tail and after["mlflow"].pid != before["mlflow"].pid
    assert after["prefect"].action == "already running" and after["prefect"].pid == before["prefect"].pid
    assert stack.is_running(params, "mlflow")
    assert client.get_experiment(experiment_id).name == "survives-restart"  # same SQLite store


def test_down_stops_everything_and_again_is_a_no_op(running: dict) -> None:
    params, state = running["params"], running["state"]
    pids = {s.name: s.pid for s in stack.up(params)}
    stopped = by_name(stack.down(params))
    assert {name: s.action for name, s in stopped.items()} == {"mlflow": "stopped", "prefect": "stopped"}
    for name, pid in pids.items():
        assert not pid_alive(pid)
        assert not (state / "stack" / f"{name}.pid").exists()
    assert not port_in_use(params.host, params.mlflow_port)
    assert not port_in_use(params.host, params.prefect_port)
    assert not stack.is_running(params, "mlflow") and not stack.is_running(params, "prefect")
    assert [s.state for s in stack.status(params)] == ["stopped", "stopped"]
    assert [s.action for s in stack.down(params)] == ["not running", "not running"]


# ---------------------------------------------------------------------------------------------
# the generic process layer, with small stand-in programs


def test_process_dying_at_start_raises_with_exit_code_and_log(tmp_path: Path) -> None:
    proc = BackgroundProcess("crash", tmp_path)
    proc.start([sys.executable, "-c", "print('boom: bad config', flush=True); raise SystemExit(3)"])
    with pytest.raises(NativelmError) as caught:
        wait_http(proc, f"http://127.0.0.1:{free_port()}/health", timeout_s=60)
    first, *rest = str(caught.value).splitlines()
    assert first == f"crash exited during start (exit code 3); log {tmp_path / 'crash.log'}, last lines:"
    assert rest == ["    | boom: bad config"]
    assert proc.status().state is ProcState.DEAD
    assert proc.stop() == "stale" and not proc.pid_path.exists()


def test_a_recycled_pid_is_never_taken_for_ours(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        proc = BackgroundProcess("svc", tmp_path)
        proc.pid_path.write_text(f"{stranger.pid}\n")
        proc.record_path.write_text(json.dumps({"pid": stranger.pid, "create_time": 1.0,
                                                "argv": ["svc"], "started_at": 0}))
        st = proc.status()
        assert st.state is ProcState.DEAD and "another program" in st.detail and not st.leftovers
        assert proc.stop(timeout_s=1) == "stale"
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pid_now_owned_by_another_process_is_not_running(tmp_path: Path) -> None:
    proc = BackgroundProcess("svc", tmp_path)
    ours = proc.start([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)  # a later clock tick: two processes forked within one tick have the same create_time
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        assert proc.is_running() and ours.create_time is not None
        assert proc.stop() == "stopped"
        # the kernel handed our recorded pid to another program: same pid, another create_time
        proc.pid_path.write_text(f"{stranger.pid}\n")
        proc.record_path.write_text(json.dumps({"pid": stranger.pid, "create_time": ours.create_time,
                                                "argv": list(ours.argv), "started_at": ours.started_at}))
        st = proc.status()
        assert st.state is ProcState.DEAD and "another program" in st.detail and not proc.is_running()
        assert proc.stop(timeout_s=1) == "stale"
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    stubborn = textwrap.dedent("""
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "60"])
        print("child-pid:", child.pid, flush=True)
        time.sleep(60)
    """)
    proc = BackgroundProcess("stubborn", tmp_path)
    rec = proc.start([sys.executable, "-c", stubborn], env={"NATIVELM_TEST": "1"}, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (found := re.search(r"^child-pid: (\d+)$", proc.log_path.read_text(), re.M)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(found.group(1))
    assert proc.status().state is ProcState.RUNNING and proc.is_running()
    assert proc.stop(timeout_s=1.0) == "killed"
    wait_dead(rec.pid)
    wait_dead(child)
    assert proc.status().state is ProcState.STOPPED


def test_process_that_never_answers_times_out_with_its_log(tmp_path: Path) -> None:
    proc = BackgroundProcess("silent", tmp_path)
    proc.start([sys.executable, "-c", "import time; print('listening soon', flush=True); time.sleep(60)"])
    try:
        url = f"http://127.0.0.1:{free_port()}/health"
        with pytest.raises(NativelmError) as caught:
            wait_http(proc, url, timeout_s=1.0)
        first, *rest = str(caught.value).splitlines()
        assert re.fullmatch(rf"silent did not answer at {re.escape(url)} within \d+ s; "
                            rf"log {re.escape(str(tmp_path / 'silent.log'))}, last lines:", first)
        assert rest == ["    | listening soon"]
        assert proc.is_running()  # wait_http leaves it as it is
    finally:
        assert proc.stop() == "stopped"
