"""`nativelm fleet ...`: the simulated fleet, board status and provisioning on the command line.

    fleet sim up [--boards N] [--canary N] [--arm64 N]
                                             start (or keep) N sshd boards (the last --arm64 N of them
                                             ARM64, emulated); write fleet.yaml + known_hosts
    fleet sim down [--purge]                 stop them (--purge: delete the simulated fleet's folder)
    fleet sim status                         each simulated board's sshd
    fleet status [--boards a,b] [--groups g] [--inventory PATH]
    fleet provision [--boards a,b] [--groups g] [--inventory PATH]
    fleet unlock --boards a,b [--groups g] [--force]   clear locks a dead rollout left behind
    fleet publish [--model SPEC] [--percent P]   pull mode: upload a signed release, ramp the channel
    fleet channel show|pause|resume          pull mode: the channel boards follow

Only the parsers are built here: the handlers (nativelm.fleet.handlers, with SSH and the rest) are
imported when a command runs, so `nativelm --help` stays fast.
"""

from __future__ import annotations

import argparse
import re

from nativelm.cliargs import at_least, nonblank
from nativelm.params.fleet import NAME_PATTERN

HANDLERS = "nativelm.fleet.handlers"
PULL_HANDLERS = "nativelm.fleet.pull_handlers"


def names(text: str) -> list[str]:
    """An argparse type: comma-separated board or group names, each held to NAME_PATTERN."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in parts if not re.fullmatch(NAME_PATTERN, part)]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"expected names such as board-1,board-2 (pattern {NAME_PATTERN}); "
                                         f"got {text!r}")
    return parts


def handler(name: str, module: str = HANDLERS) -> str:
    """The CLI's "module:function" name of handler `name` of `module` (imported when it runs)."""
    return f"{module}:{name}"


def add_board_choice(parser: argparse.ArgumentParser) -> None:
    """--boards, --groups and --inventory, as every command acting on inventory boards takes them."""
    parser.add_argument("--boards", type=names, default=None, metavar="A,B",
                        help="only these boards (comma-separated names; default: all)")
    parser.add_argument("--groups", type=names, default=None, metavar="G,H",
                        help="only boards in these groups (with --boards: either)")
    parser.add_argument("--inventory", metavar="PATH", default=None,
                        help="inventory file (default: fleet.inventory of the parameters file)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `nativelm fleet ...` to the CLI's subcommands."""
    fleet = sub.add_parser("fleet", parents=[common], help="the simulated fleet, board status, provisioning",
                           description="Manage the boards of the inventory (fleet.inventory; infra/fleet.yaml is "
                                       "an example for real boards): a simulated fleet of real sshd processes, "
                                       "each board's status, and provisioning of the board runtime.")
    actions = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    p = actions.add_parser("sim", parents=[common], help="start/stop/show the simulated fleet",
                           description="`up` starts one real OpenSSH sshd per board on loopback ports "
                                       "(fleet.sim.base_port, +1, ...), each with its own host key, home folder and "
                                       "authorized key, and writes <fleet.sim.dir>/fleet.yaml and known_hosts (and "
                                       "fleet.signing_key, the release signing key, when it does not exist); "
                                       "idempotent. `down` stops them and their sessions; `status` shows them.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--boards", type=at_least(0, 64), default=None, metavar="N", help="boards (default fleet.sim.boards)")
    p.add_argument("--canary", type=at_least(0, 64), default=None, metavar="N",
                   help="boards in group `canary` (default fleet.sim.canary)")
    p.add_argument("--arm64", type=at_least(0, 64), default=None, metavar="N",
                   help="of the boards, the last N are ARM64 boards: Debian's arm64 Python under qemu-user, its "
                        "userland built once into fleet.sim.arm64_rootfs (needs qemu-user; default fleet.sim.arm64)")
    p.add_argument("--purge", action="store_true", help="with down: also delete the simulated fleet's folder")
    p.set_defaults(handler=handler("cmd_sim"))

    p = actions.add_parser("status", parents=[common], help="reachability, platform, disk, release, benchmark",
                           description="Connect to each board (pinned host keys, key authentication) and show "
                                       "its architecture, Python, free disk, live and previous release, runtime "
                                       "virtualenv, lock holder and last on-board decode speed. The live release "
                                       "is checked every time: size and mtime of each file against the stamp "
                                       "written when it verified, every file hashed with --verify full or once "
                                       "fleet.verify_full_every_s has passed, then its health check; STATE shows "
                                       "damaged or unhealthy, OPS the graph the check ran (nativelm:<kernel>, "
                                       "fallback or contrib). Changes nothing on a board but the time of its last "
                                       "full check. Exits 1 when a board is unreachable, damaged or unhealthy. "
                                       "With fleet.mode: pull, shows instead what each board last reported to the "
                                       "store (no board is contacted); exits 1 when one failed or is silent.")
    add_board_choice(p)
    p.add_argument("--verify", choices=["auto", "full"], default="auto",
                   help="auto: size + mtime, hashes on fleet.verify_full_every_s's schedule; full: hash every "
                        "file of the live release now")
    p.set_defaults(handler=handler("cmd_status"))

    p = actions.add_parser("provision", parents=[common],
                           help="prepare boards: Python check, layout, release signing keys, runtime venv, "
                                "operator library",
                           description="On each board: check Python >= 3.9, create the layout under "
                                       "~/<fleet.remote_root>, install the agent, write keys/allowed_signers from "
                                       "fleet.allowed_signers (docs/fleet.md), and create venv/ with "
                                       "fleet.runtime_packages from wheels the controller downloads for the "
                                       "board's platform and uploads (boards need no internet); then nativelm's "
                                       "operator library, the controller's native/build.sh build for the board's "
                                       "architecture, into venv/lib (a board without one runs the fallback graph, "
                                       "and the line says so). Idempotent: a second run installs nothing.")
    add_board_choice(p)
    p.set_defaults(handler=handler("cmd_provision"))

    p = actions.add_parser("unlock", parents=[common], help="clear board locks a dead rollout left behind",
                           description="Remove the rollout lock of each chosen board when its holder is gone (a "
                                       "controller of this host that no longer runs) or the lock is older than "
                                       "fleet.lock_stale_s. A lock whose holder may still run is refused with one "
                                       "line, unless --force. Exits 1 when a board was refused or unreachable.")
    add_board_choice(p)
    p.add_argument("--force", action="store_true", help="also remove a lock whose holder may still be running")
    p.set_defaults(handler=handler("cmd_unlock"))

    register_pull(actions, common)


def percent(text: str) -> float:
    """An argparse type: a percent of the fleet, 0..100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in 0..100: {text!r}")
    return value


def register_pull(actions: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`fleet publish` and `fleet channel`: pull mode (docs/fleet-at-scale.md)."""
    p = actions.add_parser("publish", parents=[common], help="pull mode: upload a signed release, ramp the channel",
                           description="Sign the release (fleet.signing_key) and upload it once to the object store "
                                       "(fleet.pull.endpoint, bucket fleet.pull.bucket, releases/<release>/; files "
                                       "already there are not sent again; credentials from AWS_ACCESS_KEY_ID / "
                                       "AWS_SECRET_ACCESS_KEY), then write the signed channel "
                                       "channels/<fleet.pull.channel>.json: boards whose stable wave position is "
                                       "below --percent switch to it at their next poll, the others keep the "
                                       "release it replaces. Publish again with a higher --percent to widen the "
                                       "wave (refused while more boards that took it failed than "
                                       "fleet.max_failed_boards / fleet.max_failed_percent allow, unless --force); "
                                       "publish an older release to roll back.")
    p.add_argument("--model", metavar="SPEC", default=None, type=nonblank("the model"),
                   help="registered version, alias, models:/ URI or release folder (default: evaluate.release_dir)")
    p.add_argument("--percent", type=percent, default=100.0, metavar="P",
                   help="percent of the fleet that runs this release (default 100)")
    p.add_argument("--force", action="store_true", help="widen the wave even when boards that took it failed")
    p.set_defaults(handler=handler("cmd_publish", PULL_HANDLERS))

    p = actions.add_parser("channel", parents=[common], help="pull mode: show, pause or resume the channel",
                           description="show: the channel as published; pause: every board stays on what it runs "
                                       "(a new signed channel, serial + 1); resume: the ramp goes on.")
    p.add_argument("action", choices=["show", "pause", "resume"])
    p.set_defaults(handler=handler("cmd_channel", PULL_HANDLERS))
