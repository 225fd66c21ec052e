"""Bounded JSON reading for manifests: a file too large, nested too deep or not JSON is one clear line.

`json.loads` recurses once per nesting level, so a manifest of 100000 `[` ends in a RecursionError
and a huge one in a memory error; here the size is checked before reading, and the nesting (past
the parser's own limit, or past `max_depth` once parsed) is one line too. Standard library only and
importing nothing else of nativelm: the board runtime ships this file beside itself
(`nativelm.runtime.pack`), and the controller's readers of export and release manifests use it too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any


MANIFEST_BYTES = 4 << 20  # a manifest lists files and figures: kilobytes, never megabytes
MANIFEST_DEPTH = 32
class JsonFileError(ValueError):
    """A JSON file that is not a regular file, too large, too deeply nested or not JSON."""


class JsonFileMissing(JsonFileError):
    """No file at the path."""


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]


def nesting_depth(value: Any) -> int:
    """How deeply a parsed JSON value nests arrays and objects (a scalar: 0), counted without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_file(path: str | os.PathLike[str], limit_bytes: int = MANIFEST_BYTES,
                   max_depth: int = MANIFEST_DEPTH) -> Any:
    """The JSON value in `path`: a regular file of at most `limit_bytes`, nested at most `max_depth` deep.

    JsonFileMissing if it is not there; JsonFileError (one line naming the file) for anything else.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise JsonFileMissing(f"{path}: missing") from None
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise JsonFileError(f"{path}: not a regular file")
    if info.st_size > limit_bytes:
        raise JsonFileError(f"{path}: {info.st_size} bytes, more than the {limit_bytes} a JSON manifest may hold")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit_bytes + 1)
        if len(data) > limit_bytes:
            raise JsonFileError(f"{path}: grew past {limit_bytes} bytes while being read")
        text = data.decode("utf-8")
    except OSError as exc:
        raise JsonFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise JsonFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:  # the parser recurses per level: far past max_depth, stopped cleanly
        raise JsonFileError(f"{path}: nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and numbers with too many digits
        raise JsonFileError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if nesting_depth(value) > max_depth:
        raise JsonFileError(f"{path}: nested deeper than {max_depth} levels")
    return value
