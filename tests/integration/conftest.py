"""Integration fixtures: a simulated fleet of real sshd boards, provisioned once per test session.

`sim_fleet` is shared by every test that asks for it: leave it as you found it (boards running,
host keys as pinned). Tests that break boards (kill them, rotate host keys, fill disks) build their
own fleet with `make_sim_fleet` instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
from prefect.testing.utilities import prefect_test_harness

from nativelm.fleet.inventory import Inventory, load_inventory
from nativelm.fleet.provision import provision
from nativelm.fleet.sim import sim_down, sim_up
from nativelm.orchestration.clients import load_flow_module
from nativelm.params.fleet import FleetParams, SimParams
from nativelm.params.root import Params
from nativelm.params.stack import StackParams
from nativelm.stack.process import port_in_use


class SimFleet(NamedTuple):
    """A running simulated fleet: its parameters and its loaded inventory."""

    params: Params
    inventory: Inventory


def free_port_block(n: int) -> int:
    """The first of `n` consecutive loopback ports nobody listens on right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        if not any(port_in_use("127.0.0.1", base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free loopback ports found")


def sim_params(root: Path, boards: int = 3, canary: int = 1, sim: dict[str, object] | None = None,
               **fleet: object) -> Params:
    """Params whose simulated fleet, inventory and state all live under `root`, on free ports (`sim`: more
    fleet.sim values)."""
    sim = SimParams(boards=boards, canary=canary, base_port=free_port_block(boards), dir=str(root / "sim"),
                    **(sim or {}))
    key = root / "sim" / "release-signing-key"
    fleet = {"signing_key": str(key), "allowed_signers": [f"{key}.pub"], **fleet}
    return Params(stack=StackParams(state_dir=str(root / "state")),
                  fleet=FleetParams(inventory=str(root / "sim" / "fleet.yaml"), sim=sim, **fleet))


def make_sim_fleet(root: Path, boards: int = 3, canary: int = 1, provisioned: bool = True,
                   sim: dict[str, object] | None = None, **fleet: object) -> SimFleet:
    """Start a simulated fleet under `root` (stop it with `sim_down(fleet.params)`); provision it if asked."""
    params = sim_params(root, boards, canary, sim, **fleet)
    sim_up(params)
    inventory = load_inventory(params.fleet.inventory)
    if provisioned:
        results = provision(inventory, inventory.boards, params.fleet, Path(params.stack.state_dir))
        failed = [f"{r.board}: {r.error}" for r in results if not r.ok]
        assert not failed, f"provisioning the simulated fleet failed: {failed}"
    return SimFleet(params, inventory)


@contextlib.contextmanager
def running_sim_fleet(root: Path, boards: int = 3, canary: int = 1, sim: dict[str, object] | None = None,
                      **fleet: object) -> Iterator[SimFleet]:
    """A provisioned simulated fleet under `root` for the length of the block (a module fixture's own)."""
    running = make_sim_fleet(root, boards, canary, sim=sim, **fleet)
    try:
        yield running
    finally:
        sim_down(running.params)


@pytest.fixture(scope="session")
def sim_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """Three provisioned simulated boards (board-1 in group `canary`), shared by the whole session."""
    with running_sim_fleet(tmp_path_factory.mktemp("fleet")) as fleet:
        yield fleet


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `folder` (a copy of what was there goes on it); put the folder back after.

    Needs root, which CI has: the test fails loudly rather than being skipped where it cannot mount.
    """
    existed = folder.exists()
    aside = folder.with_name(folder.name + ".aside")
    if existed:
        os.rename(folder, aside)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        folder.rmdir()
        if existed:
            os.rename(aside, folder)
        pytest.fail(f"this test mounts a tmpfs and needs root: {mounted.stderr.strip()}")
    try:
        if existed:
            shutil.copytree(aside, folder, symlinks=True, dirs_exist_ok=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        if existed:
            os.rename(aside, folder)


@contextlib.contextmanager
def served_flow(relpath: str) -> Iterator[ModuleType]:
    """A flow file of pipelines/, loaded as the served deployment loads it, against a throwaway Prefect server."""
    module = load_flow_module(Path(__file__).resolve().parents[2], relpath)
    with prefect_test_harness(server_startup_timeout=120):
        yield module
