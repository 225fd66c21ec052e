"""Point a params.yaml at the team stack's boards (run when the worker image is built).

The worker image is the project itself; only where its fleet is differs from a developer's checkout:
the compose boards of infra/fleet.compose.yaml instead of the loopback simulated fleet. The file is
rewritten with its comments kept, validated first, and written whole (temporary file, then rename).
Usage: python infra/docker/compose_params.py [params.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path

from nativelm.errors import NativelmError
from nativelm.fsutil import atomic_write_text
from nativelm.orchestration.overrides import render_overrides
from nativelm.params.root import parse_params

COMPOSE_OVERRIDES = {"fleet.inventory": "infra/fleet.compose.yaml"}


def point_at_compose_fleet(path: Path) -> None:
    """Apply COMPOSE_OVERRIDES to the params file at `path` (ParamsError, file untouched, if invalid)."""
    text = render_overrides(path.read_text(encoding="utf-8"), COMPOSE_OVERRIDES)
    parse_params(text, str(path))
    atomic_write_text(path, text)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
    try:
        point_at_compose_fleet(target)
    except NativelmError as exc:
        sys.exit(f"compose_params: {exc}")
    print(f"compose_params: {target}: fleet.inventory = {COMPOSE_OVERRIDES['fleet.inventory']}")
