"""The fault matrix: randomized faults against a simulated fleet of real sshd boards, invariants after each.

    python bench/fleet_faults.py --trials N --seed S [--boards 3] [--kinds k1,k2] [--workdir DIR] [--json OUT]

A simulated fleet (`nativelm fleet sim`: one real OpenSSH sshd per board, loopback ports) is started
in a temporary folder and provisioned; the releases are the fleet tests' tiny ones (two good ones and
one whose golden continuation is wrong). Each trial picks a fault kind and a moment at random, rolls
the other good release out while the fault happens, lets the operator's usual recovery happen (the
next rollout; a restarted sshd; the new host key pinned after `nativelm fleet sim up`), and then
checks every board with `nativelm.fleet.audit`: `current` complete, verified (every file hashed) and
healthy, `previous` healthy, no lock left, every rollout log finished. A trial passes when the audit
finds nothing and the fault was reported as what it was.

Fault kinds (`--kinds`, default all):
    sigkill, sigterm, sigint   the `nativelm deploy` process gets the signal at a random moment after
                               it first locks a board (SIGTERM/SIGINT: exit 143/130 expected, locks
                               released, log "interrupted"; SIGKILL: the next rollout takes the
                               dead holder's lock over at once, the dead rollout's log is finished)
    sshd-kill                  a board's sshd is killed (SIGKILL, with its sessions) at a random point
                               of the model upload; started again before the next rollout
    tamper                     one byte of a random file of a board's live release is flipped (its
                               mtime put back in half of the trials: only a full hash finds that);
                               `fleet status` must say damaged, the next rollout repairs it, and
                               `previous` must be untouched (no file shared with it)
    disk-full                  a board's releases folder is a small tmpfs filled during the upload
                               (needs root to mount it: the trial fails, not skips, without)
    host-key                   a board's host key changes: refused, board untouched; pinned again
    concurrent                 two rollouts of the release at once: per board, one updates and the
                               other is refused "locked by ..." or finds it unchanged
    health                     the release is broken after its health check, before the switch: it
                               is switched, fails, and both links are restored (`previous` never
                               the failed release); or the bad release is rolled out: refused

Prints one line per trial and the counts by kind; exit status 1 when any trial broke an invariant.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nativelm.fleet.audit import audit, unfinished_logs
from nativelm.fleet.board_job import DeployHooks
from nativelm.fleet.inventory import Inventory
from nativelm.fleet.release import LocalRelease
from nativelm.fleet.rollout import rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.service import FleetChoice, health
from nativelm.fleet.sim import rotate_host_key, sim_down, sim_status, sim_up, start_board, stop_board
from nativelm.fleet.ssh import BoardSession
from nativelm.params.root import Params
from tests.integration.conftest import make_sim_fleet, small_disk
from tests.integration.test_fleet_deploy import BENCH, Releases, build_releases, fleet_release

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sigkill", "sigterm", "sigint", "sshd-kill", "tamper", "disk-full", "host-key", "concurrent", "health")


@dataclass
class World:
    """The fleet under test, its releases, and which good release the fleet serves now."""

    params: Params
    inventory: Inventory
    releases: Releases
    third: LocalRelease  # with keep_releases 2, the release after next is never on a board: it is uploaded
    params_file: Path
    serving: LocalRelease = field(init=False)
    notes: list[str] = field(default_factory=list)  # what this trial's fault did (printed with it)

    def __post_init__(self) -> None:
        self.serving = self.releases.old

    @property
    def state_dir(self) -> Path:
        return Path(self.params.stack.state_dir)

    def other(self) -> LocalRelease:
        """The release to roll out next: the good one no board holds (keep_releases 2), so it is uploaded."""
        cycle = [self.releases.old, self.releases.new, self.third]
        return cycle[(cycle.index(self.serving) + 1) % 3]

    def board_root(self, name: str) -> Path:
        home = next(b.home for b in sim_status(self.params) if b.name == name)
        return Path(home) / self.params.fleet.remote_root

    def deploy(self, release: LocalRelease, hooks: DeployHooks | None = None) -> RolloutResult:
        return rollout(self.inventory, self.inventory.boards, release, self.params.fleet, self.state_dir,
                       hooks=hooks)

    def names(self) -> list[str]:
        return [b.name for b in self.inventory.boards]


def make_world(work: Path, boards: int) -> World:
    """A provisioned simulated fleet under `work` serving the first good release, and its params file."""
    fleet = make_sim_fleet(work / "fleet", boards=boards, canary=1, connect_timeout_s=5, max_failed_boards=boards,
                           keep_releases=2, **BENCH)
    world = World(fleet.params, fleet.inventory, build_releases(work / "releases"),
                  fleet_release(work / "releases", 3, "third"), work / "params.yaml")
    data = fleet.params.model_dump(mode="json")
    data["tracking"]["uri"] = "off"
    world.params_file.write_text(yaml.safe_dump(data))
    for release in (world.third, world.releases.old):  # every board: current old, previous third
        result = world.deploy(release)
        assert result.ok, f"setting up the fleet failed: {[r.reason for r in result.failed]}"
    return world


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --------------------------------------------------------------------------------------------
# the faults: each returns what went wrong with how the fault was reported ([]: as expected)


def controller_signal(world: World, rng: random.Random, signum: int) -> list[str]:
    """`nativelm deploy` in its own process, signalled a random moment after it first locks a board."""
    target = world.other()
    locks = [world.board_root(n) / "lock" / "owner.json" for n in world.names()]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "nativelm.cli", "deploy", "--params", str(world.params_file),
                             "--model", str(target.folder), "--no-bench", "--no-mlflow"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    problems = []
    if wait_for(lambda: any(p.exists() for p in locks) or proc.poll() is not None):
        time.sleep(rng.uniform(0.0, 2.5))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    finished_first = proc.returncode == 0
    world.notes.append(f"exit status {proc.returncode}" + (" (finished before the signal)" if finished_first else ""))
    if signum != signal.SIGKILL and not finished_first:
        if proc.returncode != 128 + signum:
            problems.append(f"exit status {proc.returncode}, not {128 + signum}: {err.strip()[-300:]}")
        if f"interrupted by {signal.Signals(signum).name}" not in err:
            problems.append("no line saying it was interrupted")
        if "ABORTED: interrupted by" not in out:
            problems.append("no summary printed")
        # what the interrupted process itself left, before any later rollout could clean up after it
        problems += [f"{name}: still locked by {lock['owner']} after the interrupted rollout exited"
                     for name in world.names() if (lock := facts_of(world, name)["lock"])]
        problems += [f"log {rid}: not finished by the interrupted rollout" for rid in unfinished_logs(world.state_dir)]
    next_one = world.deploy(target)  # the operator's next rollout: takes a dead holder's lock over at once
    world.notes += [f"{r.board}: {r.extra[k]}" for r in next_one.boards for k in ("lock_took_over_from", "lock_cleared")
                    if r.extra.get(k)]
    if not next_one.ok:
        problems.append(f"the next rollout failed: {[f'{r.board}: {r.reason}' for r in next_one.failed]}")
    world.serving = target
    return problems


def sshd_killed(world: World, rng: random.Random) -> list[str]:
    target, victim = world.other(), rng.choice(world.names())
    fraction, killed = rng.uniform(0.05, 0.95), []

    def kill(board: str, file: str, sent: int, total: int) -> None:
        if board == victim and file == "model.onnx" and sent >= total * fraction and not killed:
            killed.append(sent)
            stop_board(world.params, victim)

    first = world.deploy(target, DeployHooks(on_progress=kill))
    failed = [r for r in first.failed if r.board == victim]
    world.notes += [f"{r.board}: {r.phase}: {r.reason}" for r in failed]
    problems = [] if killed and failed and "lost (sshd gone?)" in failed[0].reason else \
        [f"sshd killed mid-upload ({bool(killed)}) reported as: {[r.reason for r in failed]}"]
    start_board(world.params, victim)
    return problems + recover(world, target)


def recover(world: World, target: LocalRelease) -> list[str]:
    """The next rollout of `target`: it must succeed on every board."""
    result = world.deploy(target)
    world.serving = target if result.ok else world.serving
    return [] if result.ok else [f"the next rollout failed: {[f'{r.board}: {r.reason}' for r in result.failed]}"]


def tamper(world: World, rng: random.Random) -> list[str]:
    victim = rng.choice(world.names())
    root = world.board_root(victim)
    live = root / "releases" / world.serving.name
    name = rng.choice(sorted(world.serving.files))
    path, keep_mtime = live / name, rng.random() < 0.5
    info = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(rng.randrange(info.st_size))
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    problems = []
    choice = FleetChoice(world.inventory, tuple(b for b in world.inventory.boards if b.name == victim))
    row = health(world.params, choice, "full" if keep_mtime else "auto")[0]
    world.notes.append(f"{victim}: {name} flipped (mtime kept: {keep_mtime}): status {row.state}: {row.damage}")
    if row.state != "damaged":
        problems.append(f"status says {row.state} for a flipped byte in {name} (mtime kept: {keep_mtime})")
    with BoardSession(choice.boards[0], world.inventory, world.params.fleet) as session:
        previous = session.agent("facts")["previous"]
        if previous and not session.agent("check", previous, "0", "full")["ok"]:
            problems.append(f"the damage reached previous ({previous})")
    return problems + recover(world, world.serving)


def disk_full(world: World, rng: random.Random) -> list[str]:
    target, victim = world.other(), rng.choice(world.names())
    releases = world.board_root(victim) / "releases"
    with small_disk(releases, "48m") as disk:
        def fill_on_upload(board: str, phase: str, detail: str) -> None:
            if board == victim and phase == "upload":
                fill(disk, leave=rng.randrange(0, 256 * 1024))

        result = world.deploy(target, DeployHooks(on_phase=fill_on_upload))
        failed = {r.board: r for r in result.failed}
        world.notes += [f"{r.board}: {r.phase}: {r.reason}" for r in result.failed]
        problems = [] if victim not in failed or "no space left" in failed[victim].reason else \
            [f"a full disk reported as: {failed[victim].reason}"]
        with contextlib.suppress(FileNotFoundError):
            (disk / "filler").unlink()
    return problems + recover(world, target)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` (once), then free `leave` bytes."""
    filler = folder / "filler"
    if filler.exists():
        return
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def host_key(world: World, rng: random.Random) -> list[str]:
    target, victim = world.other(), rng.choice(world.names())
    rotate_host_key(world.params, victim)
    result = world.deploy(target)
    refused = next((r for r in result.boards if r.board == victim), None)
    world.notes.append(f"{victim}: {refused.phase}: {refused.reason}" if refused else f"{victim}: no result")
    problems = [] if refused is not None and refused.phase == "connect" and "refused" in refused.reason else \
        [f"a changed host key was not refused: {refused}"]
    sim_up(world.params)  # the operator checks the new key and pins it
    return problems + recover(world, target)


def concurrent(world: World, rng: random.Random) -> list[str]:
    target = world.other()
    results: list[RolloutResult] = []
    threads = [threading.Thread(target=lambda: results.append(world.deploy(target))) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(rng.uniform(0.0, 0.3))
    for thread in threads:
        thread.join(600)
    problems = []
    for board in world.names():
        rows = [next(r for r in result.boards if r.board == board) for result in results]
        world.notes.append(f"{board}: " + " / ".join(f"{r.outcome} {r.reason}".strip() for r in rows))
        outcomes = sorted(r.outcome for r in rows)
        if outcomes.count("updated") > 1:
            problems.append(f"{board}: updated by both rollouts")
        problems += [f"{board}: {r.phase}: {r.reason}" for r in rows if r.outcome == "failed"
                     and not (r.phase == "lock" and r.reason.startswith("locked by "))]
    return problems + recover(world, target)


def health_fault(world: World, rng: random.Random) -> list[str]:
    if rng.random() < 0.5:  # the bad release: refused by its health check before any switch
        result = world.deploy(world.releases.bad)
        world.notes += [f"bad release: {r.board}: {r.outcome}: {r.reason}" for r in result.boards]
        return [] if not result.ok and all(r.live == world.serving.name for r in result.boards if r.live) else \
            [f"the bad release was not refused everywhere: {[(r.board, r.outcome) for r in result.boards]}"]
    target, victim = world.other(), rng.choice(world.names())
    before = facts_of(world, victim)

    def break_it(session: BoardSession) -> None:
        if session.board.name == victim:
            path = world.board_root(victim) / "releases" / target.name / "model.onnx"
            os.chmod(path, 0o644)
            with open(path, "ab") as handle:
                handle.write(b" ")

    result = world.deploy(target, DeployHooks(before_activate=break_it))
    failed = next(r for r in result.boards if r.board == victim)
    after = facts_of(world, victim)
    world.notes.append(f"{victim}: {failed.phase}: {failed.reason}")
    problems = []
    if (failed.phase, (after["current"], after["previous"])) != ("health-current",
                                                                  (before["current"], before["previous"])):
        problems.append(f"after a failed switch: {failed.phase}: {failed.reason}; links "
                        f"{after['current']}/{after['previous']}, were {before['current']}/{before['previous']}")
    return problems + recover(world, target)


def facts_of(world: World, name: str) -> dict:
    with BoardSession(world.inventory.board(name), world.inventory, world.params.fleet) as session:
        return session.agent("facts")


FAULTS: dict[str, Callable[[World, random.Random], list[str]]] = {
    "sigkill": lambda w, r: controller_signal(w, r, signal.SIGKILL),
    "sigterm": lambda w, r: controller_signal(w, r, signal.SIGTERM),
    "sigint": lambda w, r: controller_signal(w, r, signal.SIGINT),
    "sshd-kill": sshd_killed,
    "tamper": tamper,
    "disk-full": disk_full,
    "host-key": host_key,
    "concurrent": concurrent,
    "health": health_fault,
}


def run_trial(world: World, kind: str, rng: random.Random) -> list[str]:
    """One fault of `kind`, then the audit of every board and log: every problem found, one line each."""
    for board in world.names():
        start_board(world.params, board)  # no-op when it runs
    world.notes.clear()
    problems = FAULTS[kind](world, rng)
    return problems + audit(world.inventory, world.inventory.boards, world.params.fleet, world.state_dir)


@contextlib.contextmanager
def world_in(workdir: Path | None, boards: int) -> Iterator[World]:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fleet-faults-") as work:
        world = make_world(Path(work), boards)
        try:
            yield world
        finally:
            sim_down(world.params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boards", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds (default: all)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the trials here")
    args = parser.parse_args(argv)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # a killed sshd is the point here, not news
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or args.trials < 1:
        parser.error(f"unknown kinds {unknown} (known: {', '.join(KINDS)})" if unknown else "--trials must be >= 1")
    rng = random.Random(args.seed)
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    trials = []
    with world_in(args.workdir, args.boards) as world:
        for i in range(args.trials):
            kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)  # every kind once, then random
            started = time.perf_counter()
            problems = run_trial(world, kind, rng)
            seconds = time.perf_counter() - started
            counts[kind][0] += 1
            counts[kind][1] += not problems
            trials.append({"trial": i + 1, "kind": kind, "ok": not problems, "problems": problems,
                           "notes": list(world.notes), "seconds": round(seconds, 1)})
            print(f"trial {i + 1:3d} {kind:10s} {'ok' if not problems else 'BROKEN'} ({seconds:.1f} s)"
                  + "".join(f"\n    {n}" for n in world.notes) + "".join(f"\n    PROBLEM: {p}" for p in problems),
                  flush=True)
    passed = sum(t["ok"] for t in trials)
    print(f"{passed} of {len(trials)} trials kept every invariant (seed {args.seed}, {args.boards} boards):")
    for kind in kinds:
        if kind in counts:
            print(f"  {kind:10s} {counts[kind][1]} of {counts[kind][0]}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "trials": trials}, indent=2) + "\n")
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
