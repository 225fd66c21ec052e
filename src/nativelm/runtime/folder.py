"""An export folder's files checked against its manifest: the sha256 of every file it lists.

The manifest records the sha256 of every other file (`{"sha256": {name: hex}}`, as every nativelm
manifest does; `{"files": {name: hex | {"sha256": hex}}}` and `{"files": [{"path": name, "sha256": hex}]}`
are read too). A listed file that is missing or altered is one line naming it. Ships to boards with
the runtime: the standard library and the stdlib-only `nativelm.jsonfile` only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nativelm.jsonfile import JsonFileError, read_json_file

from .errors import IntegrityError, MissingFile, RuntimeFailure

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
MODEL = "model.onnx"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files can be larger than a board's free memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFile(f"{path}: missing ({what})")
    try:
        data = read_json_file(path)
    except JsonFileError as exc:
        raise RuntimeFailure(str(exc)) from None
    if not isinstance(data, dict):
        raise RuntimeFailure(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json of an export folder; missing or unreadable is one clear line."""
    return read_json(Path(folder) / MANIFEST, "every export folder has one")


def manifest_hashes(manifest: dict[str, Any], where: Path) -> dict[str, str]:
    """{relative file name: sha256 hex} recorded in a manifest, in the layouts described above."""
    found: dict[str, str] = {}
    table = manifest.get("sha256")
    if isinstance(table, dict):
        found.update({str(k): v for k, v in table.items()})
    files = manifest.get("files")
    if isinstance(files, dict):
        for name, entry in files.items():
            found[str(name)] = entry.get("sha256") if isinstance(entry, dict) else entry
    elif isinstance(files, list):
        for entry in files:
            if isinstance(entry, dict) and (entry.get("path") or entry.get("name")):
                found[str(entry.get("path") or entry.get("name"))] = entry.get("sha256")
    for name, digest in found.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise RuntimeFailure(f"{where}: entry {name!r} has no valid sha256 ({digest!r})")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise RuntimeFailure(f"{where}: entry {name!r} is not a file name inside the folder")
    if not found:
        raise RuntimeFailure(f"{where}: lists no file hashes (expected a 'sha256' table)")
    return {name: digest.lower() for name, digest in found.items()}


def verify_folder(folder: Path, manifest: dict[str, Any] | None = None,
                  required: Sequence[str] = (MODEL, TOKENIZER)) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256; return the manifest.

    The `required` files must be listed (an unlisted model file would go unchecked). Files in the
    folder that the manifest does not list (a runtime, logs) are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFile(f"{folder}: no such model folder")
    manifest = read_manifest(folder) if manifest is None else manifest
    where = folder / MANIFEST
    hashes = manifest_hashes(manifest, where)
    for name in required:
        if name not in hashes:
            raise IntegrityError(f"{where}: has no sha256 for {name}, so it cannot be verified")
    for name in sorted(hashes):
        path = folder / name
        if not path.is_file():
            raise MissingFile(f"{path}: missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != hashes[name]:
            raise IntegrityError(f"{path}: sha256 mismatch (manifest {hashes[name][:12]}..., "
                                 f"file {actual[:12]}...): the file is altered or incomplete")
    return manifest
