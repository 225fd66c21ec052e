"""What the fleet's `nativelm` commands do once parsed: `fleet sim|status|provision`, `deploy`, `rollback`, `bench`.

Registered by `fleet.commands` and `fleet.deploy_commands`, which import this module only when a
command runs. Tables go to stdout, progress and notes to stderr; exit status 1 when a board failed
(2 for bad input: parameters, inventory, release, a command line that cannot mean anything).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nativelm.cliargs import params_of
from nativelm.errors import NativelmError
from nativelm.fleet import service, sim
from nativelm.fleet.progress import Progress
from nativelm.fleet.provision import provision, render_provision
from nativelm.fleet.service import FleetChoice
from nativelm.fleet.status import render_status
from nativelm.params.root import Params


class UsageError(NativelmError):
    """The command line asks for something it cannot mean."""

    exit_code = 2


def chosen(args: argparse.Namespace, params: Params) -> FleetChoice:
    """The inventory (--inventory or fleet.inventory) and the boards --boards / --groups select (default all)."""
    return service.choose_boards(params, args.boards or (), args.groups or (), args.inventory)


def _progress(choice: FleetChoice) -> Progress:
    return Progress([b.name for b in choice.boards], sys.stderr)


def cmd_sim(args: argparse.Namespace) -> int:
    """Start, stop or show the simulated fleet."""
    params = params_of(args)
    if args.action == "up":
        boards = sim.sim_up(params, args.boards, args.canary)
    elif args.action == "down":
        boards = sim.sim_down(params, purge=args.purge)
    else:
        boards = sim.sim_status(params)
    for line in sim.render_sim(boards):
        print(line)
    if args.action == "up":
        inventory = sim.sim_dir(params) / "fleet.yaml"
        print(f"inventory: {inventory}")
        if Path(params.fleet.inventory).absolute() != inventory:
            print(f"note: fleet.inventory is {params.fleet.inventory}; pass --inventory {inventory} to use the "
                  f"simulated fleet")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status table; exit 1 when a chosen board is unreachable."""
    params = params_of(args)
    rows = service.health(params, chosen(args, params))
    for line in render_status(rows):
        print(line)
    return 0 if all(row.reachable for row in rows) else 1


def cmd_provision(args: argparse.Namespace) -> int:
    """Provision the chosen boards; exit 1 when any failed."""
    params = params_of(args)
    choice = chosen(args, params)
    results = provision(choice.inventory, choice.boards, params.fleet, Path(params.stack.state_dir))
    for line in render_provision(results):
        print(line)
    return 0 if all(r.ok for r in results) else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """Roll a release out to the chosen boards, then benchmark the boards that serve it."""
    params = params_of(args)
    release = service.resolve(params, args.model)
    choice = chosen(args, params)
    print(f"deploy: {release.name} ({release.folder}, {release.total_bytes / 2**20:.1f} MiB) to "
          f"{len(choice.boards)} boards", file=sys.stderr)
    report = service.deploy(params, choice, release, bench=not args.no_bench, record=not args.no_mlflow,
                            progress=_progress(choice), console=service.stderr_console())
    return 0 if report.ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    """Restore the previous release (or --to RELEASE) on the chosen boards."""
    params = params_of(args)
    if not (args.boards or args.groups or args.all):
        raise UsageError("rollback: choose the boards: --boards a,b, --groups g or --all")
    choice = chosen(args, params)
    result = service.rollback(params, choice, args.to, _progress(choice), service.stderr_console())
    return 0 if result.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark the live release of the chosen boards; table on stdout, one MLflow run."""
    params = params_of(args)
    report = service.bench(params, chosen(args, params), parallel=args.parallel, record=not args.no_mlflow,
                           console=service.stderr_console())
    return 0 if report.ok else 1
