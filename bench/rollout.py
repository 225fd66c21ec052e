"""Rollout wall time to 1, 4 and 16 simulated boards: serial against parallel, and an unchanged re-rollout.

    python bench/rollout.py [--model DIR] [--boards 1,4,16] [--parallel 4,16] [--workdir DIR] [--json OUT]

For each fleet size a simulated fleet of real sshd boards is started in a temporary folder on free
loopback ports (no canary group, so every wave is purely parallel) and provisioned (its time is
reported on its own; the wheelhouse is shared by all sizes). The release (default: the evaluate
stage's ``models/release``) is then rolled out with ``fleet.max_parallel`` 1 (serial) and with each
``--parallel`` value not above the fleet size, from scratch each time (the boards' releases are
wiped between runs, so every file is sent, verified and health-checked; one untimed rollout warms
the caches first), and finally rolled out again unchanged (the hash-check fast path; target: well
under 1 s per board, connection included): its wall time over the number of boards, and each board's
own time (connect, agent check, facts, verify), which grows when many boards share the CPUs.

The simulated boards share this machine's CPUs: uploads, sha256 checks and health checks of
parallel boards compete for the same cores, so the parallel ratios here are a floor of what a fleet
of real boards (each with its own CPU) gets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nativelm.fleet.inventory import Inventory, load_inventory
from nativelm.fleet.provision import provision
from nativelm.fleet.release import LocalRelease, load_release
from nativelm.fleet.rollout import rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.sim import sim_down, sim_status, sim_up
from nativelm.params.fleet import FleetParams, SimParams
from nativelm.params.root import Params
from nativelm.params.stack import StackParams
from nativelm.stack.process import port_in_use

FIRST_PORT = 31000


def free_base_port(n: int, start: int = FIRST_PORT) -> int:
    """The lowest port from `start` up with `n` consecutive loopback ports free after it."""
    port = start
    while port + n < 65000:
        taken = [p for p in range(port, port + n) if port_in_use("127.0.0.1", p)]
        if not taken:
            return port
        port = taken[-1] + 1
    raise SystemExit(f"no {n} consecutive free loopback ports from {start}")


def fleet_params(work: Path, boards: int) -> Params:
    sim = SimParams(boards=boards, canary=0, base_port=free_base_port(boards), dir=str(work / f"sim-{boards}"))
    return Params(stack=StackParams(state_dir=str(work / "state")),
                  fleet=FleetParams(inventory=str(work / f"sim-{boards}" / "fleet.yaml"), sim=sim,
                                    max_parallel=min(boards, 16), max_failed_boards=0))


def wipe_releases(params: Params) -> None:
    """Give every simulated board an empty release area (a simulated board's home is a local folder)."""
    for board in sim_status(params):
        root = Path(board.home) / params.fleet.remote_root
        for link in ("current", "previous"):
            (root / link).unlink(missing_ok=True)
        for folder in ("releases", "bench"):
            shutil.rmtree(root / folder, ignore_errors=True)
            (root / folder).mkdir(parents=True)


def timed_rollout(inventory: Inventory, release: LocalRelease, params: Params, parallel: int) -> RolloutResult:
    fleet = params.fleet.model_copy(update={"max_parallel": parallel})
    result = rollout(inventory, inventory.boards, release, fleet, Path(params.stack.state_dir))
    if not result.ok:
        failed = "; ".join(f"{r.board}: {r.phase}: {r.reason}" for r in result.failed)
        raise SystemExit(f"rollout to {len(inventory.boards)} boards failed: {failed or result.aborted}")
    return result


def measure(release: LocalRelease, work: Path, boards: int, parallels: list[int]) -> dict[str, Any]:
    """Provision a fleet of `boards`, then time serial, parallel and unchanged rollouts on it."""
    params = fleet_params(work, boards)
    sim_up(params)
    try:
        inventory = load_inventory(params.fleet.inventory)
        started = time.perf_counter()
        results = provision(inventory, inventory.boards, params.fleet, Path(params.stack.state_dir))
        failed = [f"{r.board}: {r.error}" for r in results if not r.ok]
        if failed:
            raise SystemExit(f"provisioning failed: {failed}")
        row: dict[str, Any] = {"boards": boards, "provision_s": time.perf_counter() - started}
        wipe_releases(params)
        timed_rollout(inventory, release, params, boards)  # warm-up, untimed: file caches, first imports
        for parallel in [1, *[p for p in parallels if 1 < p <= boards]]:
            wipe_releases(params)
            result = timed_rollout(inventory, release, params, parallel)
            row[f"rollout_p{parallel}_s"] = result.seconds
            row[f"sent_mb_p{parallel}"] = sum(r.bytes_sent for r in result.boards) / 2**20
        again = timed_rollout(inventory, release, params, min(boards, max(parallels)))
        assert all(r.outcome == "unchanged" for r in again.boards)
        row["unchanged_s"] = again.seconds
        row["unchanged_s_per_board_mean"] = statistics.mean(r.seconds for r in again.boards)
        row["unchanged_s_per_board_max"] = max(r.seconds for r in again.boards)
        return row
    finally:
        sim_down(params)


def render(rows: list[dict[str, Any]], parallels: list[int], release: LocalRelease) -> list[str]:
    size = release.total_bytes / 2**20
    title = f"release {release.name}: {len(release.files)} files, {size:.2f} MiB; simulated boards share the CPUs"
    lines = [title]
    head = ["boards", "provision s", "serial s"]
    head += [f"par{p} s" for p in parallels] + [f"serial/par{p}" for p in parallels]
    head += ["unchanged s", "per board: wall/N", "each (mean, max)"]
    table = [head]
    for row in rows:
        serial = row["rollout_p1_s"]
        cells = [str(row["boards"]), f"{row['provision_s']:.1f}", f"{serial:.2f}"]
        cells += [f"{row[f'rollout_p{p}_s']:.2f}" if f"rollout_p{p}_s" in row else "-" for p in parallels]
        cells += [f"{serial / row[f'rollout_p{p}_s']:.2f}x" if f"rollout_p{p}_s" in row else "-" for p in parallels]
        cells += [f"{row['unchanged_s']:.2f}", f"{row['unchanged_s'] / row['boards']:.3f}",
                  f"{row['unchanged_s_per_board_mean']:.2f}, {row['unchanged_s_per_board_max']:.2f}"]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/release"), help="release folder to roll out")
    parser.add_argument("--boards", default="1,4,16", help="fleet sizes (comma-separated)")
    parser.add_argument("--parallel", default="4,16", help="fleet.max_parallel values compared with serial")
    parser.add_argument("--workdir", type=Path, default=None, help="keep fleets and state here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.boards.split(",")]
    parallels = [int(x) for x in args.parallel.split(",")]
    release = load_release(args.model)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nativelm-rollout-bench-"))
    rows = []
    for boards in sizes:
        print(f"fleet of {boards} boards ...", file=sys.stderr, flush=True)
        rows.append(measure(release, work, boards, parallels))
    for line in render(rows, parallels, release):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"release": release.name, "rows": rows}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
