"""What `nativelm deploy`, `rollback` and `bench` do once parsed (deploy and bench record in MLflow).

Registered by `fleet.deploy_commands`, which imports this module only when a command runs. Tables
go to stdout, progress and notes to stderr; exit status 1 when a board failed (2 for bad input).
"""

from __future__ import annotations

import argparse
import sys

from nativelm.cliargs import params_of
from nativelm.fleet import deploy_service, service
from nativelm.fleet.handlers import UsageError, progress_of
from nativelm.fleet.service import chosen
from nativelm.fleet.stopping import stopped_cleanly


def cmd_deploy(args: argparse.Namespace) -> int:
    """Roll a release out to the chosen boards, then benchmark the boards that serve it."""
    params = params_of(args)
    release = deploy_service.resolve(params, args.model)
    choice = chosen(args, params)
    print(f"deploy: {release.name} ({release.folder}, {release.total_bytes / 2**20:.1f} MiB) to "
          f"{len(choice.boards)} boards", file=sys.stderr)
    with stopped_cleanly("deploy") as stop:
        report = deploy_service.deploy(params, choice, release, bench=not args.no_bench, record=not args.no_mlflow,
                                       progress=progress_of(choice), console=service.stderr_console())
    return stop.exit_code if stop.exit_code is not None else (0 if report.ok else 1)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Restore the previous release (or --to RELEASE) on the chosen boards."""
    params = params_of(args)
    if not (args.boards or args.groups or args.all):
        raise UsageError("rollback: choose the boards: --boards a,b, --groups g or --all")
    choice = chosen(args, params)
    with stopped_cleanly("rollback") as stop:
        result = service.rollback(params, choice, args.to, progress_of(choice), service.stderr_console())
    return stop.exit_code if stop.exit_code is not None else (0 if result.ok else 1)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark the live release of the chosen boards; table on stdout, one MLflow run."""
    params = params_of(args)
    report = deploy_service.bench(params, chosen(args, params), parallel=args.parallel, record=not args.no_mlflow,
                                  console=service.stderr_console())
    return 0 if report.ok else 1
