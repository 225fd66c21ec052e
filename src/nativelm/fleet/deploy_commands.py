"""`nativelm deploy`, `nativelm rollback`, `nativelm bench`: the rollout commands of the CLI.

Each prints per-board progress on stderr and a summary table on stdout, and exits 1 when any board
failed (2 for bad input: parameters, inventory, release). `register` adds them to the `nativelm`
parser; their handlers are in nativelm.fleet.deploy_handlers, imported when a command runs.
"""

from __future__ import annotations

import argparse
import re

from nativelm.cliargs import at_least, nonblank
from nativelm.fleet.commands import add_board_choice, handler
from nativelm.params.fleet import RELEASE_PATTERN

DEPLOY_HANDLERS = "nativelm.fleet.deploy_handlers"


def release_name(text: str) -> str:
    """An argparse type: a release name as boards know it (RELEASE_PATTERN)."""
    if not re.fullmatch(RELEASE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a release name (such as v3 or sha-0123456789ab): {text!r}")
    return text


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `deploy`, `rollback` and `bench` to the `nativelm` command."""

    p = sub.add_parser(
        "deploy", parents=[common], help="roll a release out to the boards (canary first, then waves)",
        description="Roll a release out over SSH: canary boards first, then the rest in waves (cumulative "
                    "percents fleet.waves, else fleet.max_parallel boards a wave; with fleet.gate_max_slowdown each "
                    "wave's boards are benchmarked against the previous release, then fleet.wave_pause_s); files whose sha256 already matches are not sent again, interrupted "
                    "uploads resume; on each board every file is verified and the golden health check passes "
                    "before `current` is switched atomically (a failure keeps or restores the previous "
                    "release). More than fleet.max_failed_boards failed boards, or more than fleet.max_failed_percent percent, "
                    "abort the rollout; a board silent past fleet.board_deadline_s fails, its lock left. Then the "
                    "boards serving the release are benchmarked and the rollout is recorded (one MLflow run, nested "
                    "under the pipeline run that registered the version). Result log: "
                    "<stack.state_dir>/rollouts/<id>.json. A lock left by a controller of this host that died is "
                    "taken over at once. SIGTERM or Ctrl-C stops the rollout cleanly: boards unlocked, log finished "
                    "as interrupted, summary printed, exit status 143 or 130. Exit status 1 when any board failed.")
    p.add_argument("--model", metavar="SPEC", default=None, type=nonblank("the model"),
                   help="registered version (3), alias (champion), models:/NAME/3 or models:/NAME@alias "
                        "(downloaded from MLflow), or a release folder (default: evaluate.release_dir)")
    add_board_choice(p)
    p.add_argument("--no-bench", action="store_true", help="skip the on-board benchmark after the rollout")
    p.add_argument("--no-mlflow", action="store_true", help="do not record the rollout and its benchmark in MLflow")
    p.set_defaults(handler=handler("cmd_deploy", DEPLOY_HANDLERS))

    p = sub.add_parser(
        "rollback", parents=[common], help="restore the previous release on chosen boards",
        description="Point `current` back at the previous release (or --to RELEASE) on the chosen boards, "
                    "under each board's lock. The target's files are verified and its health check run before "
                    "the switch: a target failing either is never made live; one that fails through `current` "
                    "is switched back. Exit status 1 when any board failed (143/130 when stopped by SIGTERM/Ctrl-C).")
    add_board_choice(p)
    p.add_argument("--all", action="store_true", help="every board of the inventory")
    p.add_argument("--to", type=release_name, default=None, metavar="RELEASE",
                   help="release to restore, such as v3 (default: each board's previous release)")
    p.set_defaults(handler=handler("cmd_rollback", DEPLOY_HANDLERS))

    p = sub.add_parser(
        "bench", parents=[common], help="benchmark the live release on each board",
        description="Run the runtime benchmark (fleet.bench_prompt_len / bench_new_tokens / bench_repeats) on "
                    "each chosen board's live release over SSH, keep the JSON on the board, print a table and "
                    "log one MLflow run (metrics board.<board>.<metric>, table, chart). Exit status 1 when a "
                    "board could not be benchmarked.")
    add_board_choice(p)
    p.add_argument("--parallel", type=at_least(1), default=None, metavar="N",
                   help="boards benchmarked at once (default: fleet.max_parallel; boards on one host, such as "
                        "the simulated fleet's, are benchmarked one at a time whatever N)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(handler=handler("cmd_bench", DEPLOY_HANDLERS))
