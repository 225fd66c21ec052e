"""The agent's command line: `[--root DIR] COMMAND ARGS` -> one JSON object, or one `error:` line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# lock and releases are imported for their commands, which register themselves in COMMANDS
from . import AGENT_NAME, COMMANDS, AgentError, checked_args, command, lock, releases  # noqa: F401
from .files import Layout

# piped in (`python3 - --root DIR ...`, see agent_pack.inline_source): the modules have no file then
FROM_STDIN = "__file__" not in globals()


@command("pull [START]")
def cmd_pull(lay: Layout, start: str = "jittered") -> dict[str, Any]:
    """One poll of the store in pull mode (pull.py, imported only here: every other command, each an SSH
    round trip of a push rollout, starts without the HTTP client)."""
    from .pull import pull_once

    return pull_once(lay, start)


def default_root() -> Path | None:
    """<root> of an installed agent (<root>/bin/nativelm-agent.pyz), None when it was piped in."""
    return None if FROM_STDIN else Path(sys.argv[0]).resolve().parent.parent


def main(argv: list[str]) -> int:
    """Run one command; print its JSON (exit 0) or one `error:` line (exit 1)."""
    try:
        root = default_root()
        if argv[:1] == ["--root"]:
            if len(argv) < 2 or not os.path.isabs(argv[1]):
                raise AgentError("--root needs an absolute folder")
            root, argv = Path(argv[1]), argv[2:]
        if root is None:
            raise AgentError("--root DIR is needed when the agent is read from stdin")
        if not argv or argv[0] not in COMMANDS:
            raise AgentError(f"usage: {AGENT_NAME} COMMAND ARGS (commands: {', '.join(COMMANDS)})")
        usage, run = COMMANDS[argv[0]]
        reply = run(Layout(root), *checked_args(usage, argv[1:]))
    except AgentError as exc:
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    except OSError as exc:
        print("error: {}: {}".format(exc.filename or "", exc.strerror or exc).replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


def run() -> None:
    """Entry point of the zipapp: exit with main's status."""
    sys.exit(main(sys.argv[1:]))
