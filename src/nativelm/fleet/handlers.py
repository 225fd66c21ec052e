"""What the fleet's `nativelm fleet sim|status|provision` commands do once parsed (without MLflow).

Registered by `fleet.commands`, which imports this module only when a command runs; `deploy`,
`rollback` and `bench` are nativelm.fleet.deploy_handlers. Tables go to stdout, progress and notes to stderr; exit status 1 when a board failed
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
from nativelm.fleet.service import FleetChoice, chosen
from nativelm.fleet.status import render_status
from nativelm.fleet.unlock import unlock


class UsageError(NativelmError):
    """The command line asks for something it cannot mean."""

    exit_code = 2


def progress_of(choice: FleetChoice) -> Progress:
    """Live per-board progress on stderr."""
    return Progress([b.name for b in choice.boards], sys.stderr)


def cmd_sim(args: argparse.Namespace) -> int:
    """Start, stop or show the simulated fleet."""
    params = params_of(args)
    if args.action == "up":
        boards = sim.sim_up(params, args.boards, args.canary, args.arm64)
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
    """Print the status table; exit 1 when a chosen board is unreachable, damaged or unhealthy (pull mode:
    what the boards reported to the store; exit 1 when one failed or is silent)."""
    params = params_of(args)
    if params.fleet.mode == "pull":
        from nativelm.fleet.pull_handlers import pulled_fleet_status  # here: it loads MLflow (deploy_service)

        return pulled_fleet_status(args, params)
    rows = service.health(params, chosen(args, params), args.verify)
    for line in render_status(rows):
        print(line)
    return 0 if all(row.reachable and not service.live_problem(row) for row in rows) else 1


def cmd_unlock(args: argparse.Namespace) -> int:
    """Clear the locks left on the chosen boards; exit 1 when one was refused (a live holder) or failed."""
    params = params_of(args)
    if not (args.boards or args.groups):
        raise UsageError("fleet unlock: choose the boards: --boards a,b or --groups g")
    choice = chosen(args, params)
    results = unlock(choice.inventory, choice.boards, params.fleet, force=args.force)
    for result in results:
        print(result.line)
    return 0 if all(r.ok for r in results) else 1


def cmd_provision(args: argparse.Namespace) -> int:
    """Provision the chosen boards; exit 1 when any failed."""
    params = params_of(args)
    choice = chosen(args, params)
    results = provision(choice.inventory, choice.boards, params.fleet, Path(params.stack.state_dir))
    for line in render_provision(results):
        print(line)
    return 0 if all(r.ok for r in results) else 1
