"""Pieces every `nativelm` subcommand shares, wherever it is defined (cli/, fleet/...)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from nativelm.params.root import Params, load_params


def params_of(args: argparse.Namespace) -> Params:
    """The parameters file of the command line (`--params PATH`, default params.yaml), validated."""
    return load_params(getattr(args, "params", None))


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than `minimum` (and no larger than `maximum`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def nonblank(what: str) -> Callable[[str], str]:
    """An argparse type: a value that is not empty or blank (an unset `$VERSION` in a script must stop the
    command, never fall back to its default)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} is empty; give one (leave the option out for the default)")
        return text

    return parse
