"""`nativelm deploy`, `nativelm rollback`, `nativelm bench`: the rollout commands of the CLI.

Each prints per-board progress on stderr and a summary table on stdout, and exits 1 when any board
failed (2 for bad input: parameters, inventory, release). `register` adds them to the `nativelm`
parser; the handlers are plain functions of the parsed arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nativelm.cliargs import at_least, params_of
from nativelm.errors import NativelmError
from nativelm.fleet.commands import add_board_choice, chosen_boards
from nativelm.params.fleet import RELEASE_PATTERN

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.fleet.rollout import RolloutResult
    from nativelm.params.root import Params


class UsageError(NativelmError):
    """The command line asks for something it cannot mean."""

    exit_code = 2


def release_name(text: str) -> str:
    """An argparse type: a release name as boards know it (RELEASE_PATTERN)."""
    if not re.fullmatch(RELEASE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a release name (such as v3 or sha-0123456789ab): {text!r}")
    return text


def _progress(boards: list[Board]):  # -> Progress
    from nativelm.fleet.progress import Progress

    return Progress([b.name for b in boards], sys.stderr)


def _finish(result: RolloutResult) -> int:
    from nativelm.fleet.rollout import render_rollout

    for line in render_rollout(result):
        print(line)
    return 0 if result.ok else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """Roll a release out to the chosen boards, then benchmark the boards that serve it."""
    from nativelm.fleet.release import resolve_release
    from nativelm.fleet.rollout import rollout, serving_boards

    params = params_of(args)
    release = resolve_release(args.model or params.evaluate.release_dir, params)
    inventory, boards = chosen_boards(args, params)
    print(f"deploy: {release.name} ({release.folder}, {release.total_bytes / 2**20:.1f} MiB) to "
          f"{len(boards)} boards", file=sys.stderr)
    result = rollout(inventory, boards, release, params.fleet, Path(params.stack.state_dir),
                     progress=_progress(boards))
    status = _finish(result)
    if not args.no_bench:
        _bench(params, inventory, serving_boards(boards, result, release.name), args.no_mlflow, result.rollout_id,
               release.name, release.version)
    return status


def cmd_rollback(args: argparse.Namespace) -> int:
    """Restore the previous release (or --to RELEASE) on the chosen boards."""
    from nativelm.fleet.rollout import rollback

    params = params_of(args)
    if not (args.boards or args.groups or args.all):
        raise UsageError("rollback: choose the boards: --boards a,b, --groups g or --all")
    inventory, boards = chosen_boards(args, params)
    result = rollback(inventory, boards, params.fleet, Path(params.stack.state_dir), to=args.to,
                      progress=_progress(boards))
    return _finish(result)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark the live release of the chosen boards; table on stdout, one MLflow run."""
    from nativelm.fleet.rollout import new_rollout_id

    params = params_of(args)
    inventory, boards = chosen_boards(args, params)
    rows = _bench(params, inventory, boards, args.no_mlflow, new_rollout_id("bench"), None, None,
                  parallel=args.parallel)
    return 1 if any(row.error for row in rows) else 0


def _bench(params: Params, inventory: Inventory, boards: list[Board], no_mlflow: bool, rollout_id: str,
           release: str | None, version: int | None, parallel: int | None = None) -> list:
    from nativelm.fleet.onboard_bench import bench_fleet, log_bench_run, render_bench

    if not boards:
        return []
    print(f"bench: {len(boards)} boards (prompt {params.fleet.bench_prompt_len} tokens, "
          f"{params.fleet.bench_new_tokens} new tokens, {params.fleet.bench_repeats} repeats)", file=sys.stderr)
    rows = bench_fleet(inventory, boards, params.fleet, parallel)
    for line in render_bench(rows):
        print(line)
    if not no_mlflow:
        releases = sorted({row.release for row in rows if row.release})
        run_id = log_bench_run(params, rows, rollout_id=rollout_id,
                               release=release or (releases[0] if len(releases) == 1 else ",".join(releases)),
                               version=version)
        if run_id:
            print(f"bench: MLflow run {run_id}")
    return rows


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `deploy`, `rollback` and `bench` to the `nativelm` command."""

    p = sub.add_parser(
        "deploy", parents=[common], help="roll a release out to the boards (canary first, then waves)",
        description="Roll a release out over SSH: canary boards first, then the rest in waves of "
                    "fleet.max_parallel; files whose sha256 already matches are not sent again, interrupted "
                    "uploads resume; on each board every file is verified and the golden health check passes "
                    "before `current` is switched atomically (a failure keeps or restores the previous "
                    "release). More than fleet.max_failed_boards failed boards abort the rollout. Then the "
                    "boards serving the release are benchmarked (one MLflow run). Result log: "
                    "<stack.state_dir>/rollouts/<id>.json. Exit status 1 when any board failed.")
    p.add_argument("--model", metavar="SPEC", default=None,
                   help="registered version (3), alias (champion), models:/NAME/3 or models:/NAME@alias "
                        "(downloaded from MLflow), or a release folder (default: evaluate.release_dir)")
    add_board_choice(p)
    p.add_argument("--no-bench", action="store_true", help="skip the on-board benchmark after the rollout")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the benchmark to MLflow")
    p.set_defaults(handler=cmd_deploy)

    p = sub.add_parser(
        "rollback", parents=[common], help="restore the previous release on chosen boards",
        description="Point `current` back at the previous release (or --to RELEASE) on the chosen boards, "
                    "under each board's lock, after verifying its files; a release that then fails its "
                    "health check is switched back. Exit status 1 when any board failed.")
    add_board_choice(p)
    p.add_argument("--all", action="store_true", help="every board of the inventory")
    p.add_argument("--to", type=release_name, default=None, metavar="RELEASE",
                   help="release to restore, such as v3 (default: each board's previous release)")
    p.set_defaults(handler=cmd_rollback)

    p = sub.add_parser(
        "bench", parents=[common], help="benchmark the live release on each board",
        description="Run the runtime benchmark (fleet.bench_prompt_len / bench_new_tokens / bench_repeats) on "
                    "each chosen board's live release over SSH, keep the JSON on the board, print a table and "
                    "log one MLflow run (metrics board.<board>.<metric>, table, chart). Exit status 1 when a "
                    "board could not be benchmarked.")
    add_board_choice(p)
    p.add_argument("--parallel", type=at_least(1), default=None, metavar="N",
                   help="boards benchmarked at once (default: fleet.max_parallel; 1 for simulated boards that "
                        "share this machine's CPUs)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=cmd_bench)
