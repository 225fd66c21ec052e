"""The controller's cost per board, push against pull, on one machine; extrapolated to large fleets.

    python bench/fleet_scale.py [--push 4,8,16] [--pull 100,1000] [--repeats 2] [--threads 16] [--json OUT]

Push: a simulated fleet of N real sshd boards (`nativelm fleet sim`) gets the fleet tests' release
(1.9 MiB of model) by `nativelm.fleet.rollout` from scratch (every file sent, verified, health-checked
by the release's own runtime through SSH), fleet.max_parallel = min(N, 8). Measured in this process
(the controller): CPU seconds (user + system, all threads), wall time, bytes sent and SSH round
trips (commands run on the boards), each over N.

Pull: the same release is published once (`nativelm.fleet.publish`) to a real S3 HTTP server (moto,
standing in for the team stack's MinIO: Docker is not available here), then M simulated boards (a
folder each, laid out as provisioning leaves a board) each run the agent's real poll
(`nativelm.fleet.agent.pull.poll`: conditional GET of the channel, signature checks with
ssh-keygen, fetch, verify, seal, switch, report) from a pool of --threads threads; then every
board polls again with nothing new (the steady state of a timer). The boards' health check is not
run here (board CPU, not the controller's: 1000 onnxruntime start-ups would take the 2 cores
~20 min; the integration test runs it). Measured: the controller's CPU for the publish, and the
store's CPU (the moto process; MinIO serves a GET with far less), requests and bytes served, each
per board and per poll.

Board names, keys and folders live in a temporary folder removed at the end. Each figure is given
as the range over --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from nativelm.fleet.agent.files import Layout
from nativelm.fleet.agent.pull import poll
from nativelm.fleet.agent.pull_fetch import read_config
from nativelm.fleet.inventory import load_inventory
from nativelm.fleet.provision import check_packages, provision
from nativelm.fleet.publish import publish, store_client
from nativelm.fleet.release import LocalRelease
from nativelm.fleet.rollout import rollout
from nativelm.fleet.signing import create_signing_key
from nativelm.fleet.sim import sim_down, sim_status, sim_up
from nativelm.fleet.sim_store import create_fleet_bucket, make_pull_board, moto_store, runtime_wrapper, use_test_credentials
from nativelm.fleet.ssh import BoardSession
from nativelm.params.fleet import FleetParams, PullParams
from tests.integration.test_fleet_deploy import BENCH, fleet_release

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import fleet_params, wipe_releases  # noqa: E402 - bench/rollout.py, beside this script

PACKAGES_FILE = "nativelm-packages.json"


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def counting_runs() -> Callable[[], int]:
    """Count the commands the controller runs on boards (each an SSH round trip); returns the reader."""
    count = [0]
    original = BoardSession.run

    def run(self: BoardSession, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    BoardSession.run = run  # type: ignore[method-assign]
    return lambda: count[0]


def push_fleet(work: Path, boards: int, key: Path) -> Any:
    """A simulated fleet of `boards` sshd boards, provisioned; each board's runtime virtualenv is a
    wrapper around this machine's Python (the pinned packages are there: no N installs of the same wheels)."""
    params = fleet_params(work, boards)
    fleet = params.fleet.model_copy(update={"signing_key": str(key), "allowed_signers": [f"{key}.pub"],
                                            "max_parallel": min(boards, 8), **BENCH})
    params = params.model_copy(update={"fleet": fleet})
    sim_up(params)
    for board in sim_status(params):
        venv = Path(board.home) / fleet.remote_root / "venv"
        runtime_wrapper(venv)
        (venv / PACKAGES_FILE).write_text(json.dumps(check_packages(fleet.runtime_packages)))
    inventory = load_inventory(fleet.inventory)
    failed = [f"{r.board}: {r.error}" for r in provision(inventory, inventory.boards, fleet, Path(params.stack.state_dir))
              if not r.ok]
    if failed:
        sim_down(params)
        raise SystemExit(f"provisioning failed: {failed}")
    return params, inventory


def measure_push(work: Path, boards: int, release: LocalRelease, key: Path, repeats: int,
                 runs: Callable[[], int]) -> list[dict[str, float]]:
    params, inventory = push_fleet(work, boards, key)
    rows = []
    try:
        for _ in range(repeats):
            wipe_releases(params)
            cpu, wall, calls = cpu_s(), time.perf_counter(), runs()
            result = rollout(inventory, inventory.boards, release, params.fleet, Path(params.stack.state_dir))
            wall, cpu, calls = time.perf_counter() - wall, cpu_s() - cpu, runs() - calls
            if not result.ok:
                raise SystemExit(f"push to {boards} boards failed: {[(r.board, r.reason) for r in result.failed]}")
            rows.append({"boards": boards, "cpu_s_per_board": cpu / boards, "wall_s_per_board": wall / boards,
                         "wall_s": wall, "mib_per_board": sum(r.bytes_sent for r in result.boards) / boards / 2**20,
                         "round_trips_per_board": calls / boards})
    finally:
        sim_down(params)
    return rows


def poll_all(roots: list[Path], threads: int) -> list[dict[str, Any]]:
    """Every board polls once (the real agent poll; health not run, see the module docstring)."""
    def one(root: Path) -> dict[str, Any]:
        lay = Layout(root)
        return poll(lay, read_config(lay), health=lambda lay, folder: None)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, roots))


def measure_pull(work: Path, boards: int, release: LocalRelease, key: Path, threads: int) -> dict[str, float]:
    with moto_store() as (endpoint, process):
        store = psutil.Process(process.pid)
        fleet = FleetParams(signing_key=str(key), allowed_signers=[f"{key}.pub"], mode="pull",
                            pull=PullParams(endpoint=endpoint, jitter_s=0))
        client = store_client(fleet.pull)
        create_fleet_bucket(client, fleet.pull.bucket)
        roots = [make_pull_board(work / f"pull-{boards}" / f"board-{i:05d}", fleet, f"board-{i:05d}")
                 for i in range(boards)]
        cpu, wall = cpu_s(), time.perf_counter()
        publish(release, fleet, 100, client)
        publish_cpu, publish_wall = cpu_s() - cpu, time.perf_counter() - wall
        row: dict[str, float] = {"boards": boards, "publish_cpu_s": publish_cpu, "publish_wall_s": publish_wall}
        for phase in ("update", "steady"):
            before, wall = sum(store.cpu_times()[:2]), time.perf_counter()
            reports = poll_all(roots, threads)
            row[f"{phase}_wall_s"] = time.perf_counter() - wall
            row[f"{phase}_store_cpu_ms_per_board"] = (sum(store.cpu_times()[:2]) - before) / boards * 1000
            bad = [r for r in reports if r["outcome"] != ("updated" if phase == "update" else "unchanged")]
            if bad:
                raise SystemExit(f"pull {phase}: {len(bad)} boards: {bad[0]}")
            row[f"{phase}_requests_per_board"] = sum(r["requests"] for r in reports) / boards
            row[f"{phase}_mib_per_board"] = sum(r["bytes"] for r in reports) / boards / 2**20
        shutil.rmtree(work / f"pull-{boards}", ignore_errors=True)
        return row


def span(rows: list[dict[str, float]], key: str, fmt: str = "{:.3f}") -> str:
    values = [row[key] for row in rows]
    low, high = min(values), max(values)
    return fmt.format(low) if low == high or len(values) == 1 else f"{fmt.format(low)}-{fmt.format(high)}"


def render(push: dict[int, list], pull: dict[int, list], poll_s: float) -> list[str]:
    lines = ["push (controller = this process; health checks run on the boards)",
             "boards  cpu s/board  wall s/board  MiB sent/board  round trips/board"]
    for n, rows in push.items():
        lines.append(f"{n:>6}  {span(rows, 'cpu_s_per_board'):>11}  {span(rows, 'wall_s_per_board'):>12}  "
                     f"{span(rows, 'mib_per_board', '{:.2f}'):>14}  {span(rows, 'round_trips_per_board', '{:.1f}'):>17}")
    lines += ["", "pull (controller: one publish; store: the moto server)",
              "boards  publish cpu s  update: req/board  MiB/board  store cpu ms/board  wall s  |  steady poll: "
              "req/board  MiB/board  store cpu ms/board"]
    for n, rows in pull.items():
        lines.append(f"{n:>6}  {span(rows, 'publish_cpu_s'):>13}  {span(rows, 'update_requests_per_board', '{:.1f}'):>17}  "
                     f"{span(rows, 'update_mib_per_board', '{:.2f}'):>9}  {span(rows, 'update_store_cpu_ms_per_board', '{:.1f}'):>18}  "
                     f"{span(rows, 'update_wall_s', '{:.1f}'):>6}  |  {span(rows, 'steady_requests_per_board', '{:.1f}'):>21}  "
                     f"{span(rows, 'steady_mib_per_board', '{:.4f}'):>9}  {span(rows, 'steady_store_cpu_ms_per_board', '{:.2f}'):>18}")
    if push and pull:
        big_push = push[max(push)]
        big_pull = pull[max(pull)]
        per_board = min(r["cpu_s_per_board"] for r in big_push)
        steady = min(r["steady_store_cpu_ms_per_board"] for r in big_pull) / 1000
        lines += ["", f"extrapolated (lowest measured figure per board, polls every {poll_s:g} s):"]
        for fleet in (1000, 10000, 100000):
            lines.append(f"  {fleet:>6} boards: push {per_board * fleet / 60:.0f} controller CPU min a rollout; pull "
                         f"{min(r['publish_cpu_s'] for r in big_pull):.2f} s a publish, store "
                         f"{fleet / poll_s:.1f} polls/s using {steady * fleet / poll_s * 100:.1f}% of a core between releases")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--push", default="4,8,16", help="push fleet sizes (real sshd boards; comma-separated, '' none)")
    parser.add_argument("--pull", default="100,1000", help="pull fleet sizes (simulated board agents)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each size (figures are their range)")
    parser.add_argument("--threads", type=int, default=16, help="threads the simulated pulled boards poll from")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    use_test_credentials()
    work = Path(tempfile.mkdtemp(prefix="nativelm-fleet-scale-"))
    try:
        key = work / "release-key"
        create_signing_key(key)
        release = fleet_release(work / "release", 0, "scale")
        runs = counting_runs()
        push = {}
        for n in [int(x) for x in args.push.split(",") if x]:
            print(f"push to {n} boards ...", file=sys.stderr, flush=True)
            push[n] = measure_push(work, n, release, key, args.repeats, runs)
        pull = {}
        for m in [int(x) for x in args.pull.split(",") if x]:
            print(f"pull by {m} boards ...", file=sys.stderr, flush=True)
            pull[m] = [measure_pull(work, m, release, key, args.threads) for _ in range(args.repeats)]
        for line in render(push, pull, PullParams().poll_s):
            print(line)
        if args.json:
            args.json.write_text(json.dumps({"release_mib": release.total_bytes / 2**20, "push": push, "pull": pull},
                                            indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
