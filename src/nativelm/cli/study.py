"""`nativelm study`: native against compressed on the project's own data (docs/study.md)."""

from __future__ import annotations

import argparse
from typing import Any

from nativelm.cliargs import params_of
from nativelm.errors import ParamsError
from nativelm.params.study import ALL_ROWS
from nativelm.study.stage import run_study


def _listed(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ParamsError(f"study: {text!r} is not a comma-separated list of {kind.__name__} values") from None


def study(args: argparse.Namespace) -> int:
    params = params_of(args)
    rows = list(ALL_ROWS) if args.rows == "all" else _listed(args.rows, str)
    section = params.study.with_overrides(
        {"rows": rows, "lrs": _listed(args.lrs, float), "seeds": _listed(args.seeds, int), "steps": args.steps,
         "preset": args.preset, "device": args.device, "name": args.name,
         "boards": _listed(args.boards, str), "devices": _listed(args.devices, str)},
        "study (params.yaml and the command line)")
    run_study(params, section)
    return 0
