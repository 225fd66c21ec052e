"""Prefect flow `fleet-health`: every board's reachability, live release and last benchmark (scheduled)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from nativelm.errors import NativelmError
from nativelm.fleet import service
from nativelm.fleet.status import render_status
from nativelm.params.root import load_params

PROJECT_DIR = Path(__file__).resolve().parents[1]


@flow(name="fleet-health", log_prints=True)
def fleet_health(params_file: str = "params.yaml") -> dict:
    """Check every board; the run fails (red in the UI) when a board is unreachable or serves nothing.

    Args:
        params_file: parameters file of the project
    """
    params = load_params(PROJECT_DIR / params_file)
    rows = service.health(params, service.choose_boards(params))
    for line in render_status(rows):
        print(line)
    problems = service.unhealthy(rows)
    if problems:
        raise NativelmError(f"{len(problems)} board(s) unhealthy: " + "; ".join(problems))
    return {r.board: {"current": r.current, "decode_tokens_per_s": r.decode_tokens_per_s} for r in rows}


if __name__ == "__main__":
    fleet_health()
