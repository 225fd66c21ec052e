"""What every artifact file shares: a `format` name and a `format_version`, JSON manifests written the same
way, and one clear line for anything that cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nativelm.errors import NativelmError
from nativelm.jsonfile import JsonFileError, JsonFileMissing, read_json_file


def checked(data: Any, path: Path, name: str, version: int, what: str) -> dict[str, Any]:
    """`data` if it is a mapping of format `name` at `version`; else one NativelmError line naming `path`."""
    if not isinstance(data, dict) or data.get("format") != name:
        raise NativelmError(f"{path}: not a {what}")
    if data.get("format_version") != version:
        raise NativelmError(f"{path}: {what} format version {data.get('format_version')}, this nativelm reads "
                            f"{version}")
    return data


def read_json(path: Path, missing_hint: str) -> Any:
    """A JSON manifest, bounded in size and nesting; missing (with `missing_hint`) or unreadable is one clear
    line."""
    try:
        return read_json_file(path)
    except JsonFileMissing:
        raise NativelmError(f"{path}: not found ({missing_hint})") from None
    except JsonFileError as exc:
        raise NativelmError(str(exc)) from None



def write_json(path: Path, data: dict[str, Any]) -> Path:
    """A manifest into a folder being built (sorted keys: the same content gives the same bytes)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
