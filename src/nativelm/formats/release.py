"""The release folder (`evaluate` builds it, registers it in MLflow; the fleet ships it to boards).

The export folder's files, ``nativelm-runtime.pyz`` (the board runtime as one zipapp) and
``release.json``: format, provenance (git commit, data hash, params hash, source model) and the
sha256 of every other file. It carries no version number: the same inputs give the same release,
whatever the registry calls it. The board agent (`nativelm.fleet.agent`, standard library only)
keeps its own copy of the manifest's name; a test checks it is equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nativelm.fsutil import atomic_dir, sha256_file
from nativelm.runtime.pack import build_zipapp

FORMAT = "nativelm-release"
FORMAT_VERSION = 1
MANIFEST = "release.json"
RUNTIME_FILE = "nativelm-runtime.pyz"
REGISTRY_TAGS = ("git_commit", "data_hash", "params_hash")  # provenance tags of a registered version


def release_files(folder: Path) -> dict[str, str]:
    """{file name: sha256} of every file of a release folder but release.json."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def build_release(release_dir: Path, export_dir: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write a release folder atomically (export files + board runtime + release.json); return release.json."""
    with atomic_dir(release_dir) as folder:
        for path in sorted(export_dir.iterdir()):
            if path.is_file():
                shutil.copyfile(path, folder / path.name)
        build_zipapp(folder / RUNTIME_FILE)
        release = {"format": FORMAT, "format_version": FORMAT_VERSION, **provenance, "sha256": release_files(folder)}
        (folder / MANIFEST).write_text(json.dumps(release, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return release
