"""What `nativelm fleet publish` and `nativelm fleet channel` do once parsed, and `fleet status` in pull mode.

Registered by `fleet.commands`, imported only when a command runs (docs/fleet-at-scale.md).
"""

from __future__ import annotations

import argparse

from nativelm.cliargs import params_of
from nativelm.fleet import deploy_service
from nativelm.fleet.publish import StoreError, publish, read_channel, set_paused, store_client
from nativelm.fleet.pull_gate import widening_refusal
from nativelm.fleet.pull_status import BAD, channel_line, pulled_status, render_pulled
from nativelm.fleet.service import chosen
from nativelm.params.root import Params


def cmd_publish(args: argparse.Namespace) -> int:
    """Upload a signed release to the store once and ramp the channel to --percent of the boards."""
    params = params_of(args)
    release = deploy_service.resolve(params, args.model)
    client = store_client(params.fleet.pull)
    refusal = None if args.force else widening_refusal(client, params.fleet, release.name, args.percent)
    if refusal:
        raise StoreError(refusal)
    done = publish(release, params.fleet, args.percent, client)
    print(f"published {done.release}: {done.files_sent} files sent ({done.bytes_sent / 2**20:.1f} MiB), "
          f"{done.files_kept} already in the store")
    print(channel_line(done.channel))
    return 0


def cmd_channel(args: argparse.Namespace) -> int:
    """Show, pause or resume the channel boards follow."""
    params = params_of(args)
    if args.action == "show":
        channel = read_channel(store_client(params.fleet.pull), params.fleet.pull)
        print(channel_line(channel) if channel else f"channel {params.fleet.pull.channel}: never published")
        return 0
    print(channel_line(set_paused(params.fleet, args.action == "pause")))
    return 0


def pulled_fleet_status(args: argparse.Namespace, params: Params) -> int:
    """`fleet status` when fleet.mode is pull: the boards' reports in the store (without --boards/--groups also
    boards the inventory does not list); exit 1 when one failed or is silent."""
    boards = [b.name for b in chosen(args, params).boards]
    channel, rows = pulled_status(params.fleet.pull, boards, others=not (args.boards or args.groups))
    for line in render_pulled(channel, rows):
        print(line)
    return 1 if any(r.state in BAD for r in rows) else 0
