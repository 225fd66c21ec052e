"""The release a rollout ships: a verified local folder, named the way boards will know it.

A release folder is what `nativelm evaluate` builds: the export's files, ``nativelm-runtime.pyz``
and ``release.json`` (the sha256 of every other file). `resolve_release` accepts

- a registered version of ``evaluate.registered_model`` (``3``, ``models:/nativelm/3``), or an alias
  (``champion``, ``models:/nativelm@champion``): its ``release/`` artifact folder is downloaded from
  MLflow into ``<stack.state_dir>/releases/v<N>/`` (atomically; a verified copy there is reused);
- a path to a release folder.

Registered versions are called ``v<N>`` on a board; a plain folder is called
``sha-<first 12 hex of its release.json's sha256>``, so the same folder always gets the same name.
Every file is checked against release.json before anything is sent.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from nativelm.errors import NativelmError
from nativelm.formats.release import FORMAT as RELEASE_FORMAT
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST
from nativelm.formats.release import RUNTIME_FILE
from nativelm.fsutil import atomic_dir, sha256_file
from nativelm.jsonfile import JsonFileError, read_json_file
from nativelm.tracking.runs import required_tracking_uri

if TYPE_CHECKING:
    from nativelm.params.root import Params

# file names a board accepts (the agent checks the same pattern): flat, no hidden files
FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# MLflow aliases as the gate sets them; anything else that is not a folder is refused
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


class ReleaseError(NativelmError):
    """A release folder that does not verify, or a version / alias the registry does not know."""

    exit_code = 2


class ReleaseFile(NamedTuple):
    """One file of a local release."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class LocalRelease:
    """A verified release folder on this machine."""

    folder: Path
    name: str  # what boards call it: v<N> or sha-<12 hex>
    manifest: dict[str, Any]  # release.json
    files: dict[str, ReleaseFile]  # every file that ships, release.json included
    version: int | None = None  # registered version, when it came from the registry

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / RELEASE_MANIFEST
    if not folder.is_dir():
        raise ReleaseError(f"{folder}: no release folder there")
    if not path.is_file():
        raise ReleaseError(f"{folder}: has no {RELEASE_MANIFEST} (not a release folder; `nativelm evaluate` builds one)")
    try:
        manifest = read_json_file(path)
    except JsonFileError as exc:
        raise ReleaseError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != RELEASE_FORMAT:
        raise ReleaseError(f"{path}: format is not {RELEASE_FORMAT!r}")
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise ReleaseError(f"{path}: has no sha256 map of the release's files")
    return manifest


def _checked_file(folder: Path, name: Any, expected: Any) -> ReleaseFile:
    where = folder / RELEASE_MANIFEST
    if not isinstance(name, str) or not FILE_PATTERN.match(name) or name == RELEASE_MANIFEST:
        raise ReleaseError(f"{where}: sha256 lists {name!r}, not a plain file name a board accepts")
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ReleaseError(f"{where}: sha256.{name} is not a hex sha256")
    path = folder / name
    if not path.is_file():
        raise ReleaseError(f"{folder}: missing file {name} (listed in {RELEASE_MANIFEST})")
    actual = sha256_file(path)
    if actual != expected:
        raise ReleaseError(f"{folder}: hash mismatch: {name} (release.json says {expected[:12]}, file is {actual[:12]})")
    return ReleaseFile(path, actual, path.stat().st_size)


def plain_release_name(manifest_sha256: str) -> str:
    """The board-side name of a release folder that is not a registered version."""
    return f"sha-{manifest_sha256[:12]}"


def load_release(folder: Path, version: int | None = None) -> LocalRelease:
    """Verify a release folder file by file and describe it; one line naming the first problem."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    files = {name: _checked_file(folder, name, sha) for name, sha in sorted(manifest["sha256"].items())}
    if RUNTIME_FILE not in files:
        raise ReleaseError(f"{folder}: release.json lists no {RUNTIME_FILE} (the board runtime)")
    meta = folder / RELEASE_MANIFEST
    meta_sha = sha256_file(meta)
    files[RELEASE_MANIFEST] = ReleaseFile(meta, meta_sha, meta.stat().st_size)
    name = f"v{version}" if version is not None else plain_release_name(meta_sha)
    return LocalRelease(folder, name, manifest, files, version)


# --------------------------------------------------------------------------------------------
# the MLflow model registry


@dataclass(frozen=True)
class RegistrySpec:
    """A registry reference: a model name and either a version number or an alias."""

    model: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.model}/{self.version}" if self.version is not None else f"models:/{self.model}@{self.alias}"


def parse_spec(spec: str, registered_model: str) -> RegistrySpec | Path:
    """What `--model SPEC` names: a registry reference or a folder (existing folders win over aliases)."""
    spec = spec.strip()
    found = _MODELS_URI.match(spec)
    if found:
        version = found.group("version")
        return RegistrySpec(found.group("name"), int(version) if version else None, found.group("alias"))
    if spec.isdigit():
        return RegistrySpec(registered_model, version=int(spec))
    path = Path(spec).expanduser()
    if path.is_dir() or not _ALIAS.match(spec):
        return path
    return RegistrySpec(registered_model, alias=spec)


def _model_version(uri: str, spec: RegistrySpec) -> Any:
    client = MlflowClient(tracking_uri=uri)
    try:
        if spec.version is not None:
            return client.get_model_version(spec.model, str(spec.version))
        return client.get_model_version_by_alias(spec.model, spec.alias)
    except MlflowException as exc:
        what = f"version {spec.version}" if spec.version is not None else f"alias {spec.alias!r}"
        detail = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        raise ReleaseError(f"{spec}: registered model {spec.model!r} has no {what} at {uri} ({detail})") from None


def _download(uri: str, source: str, target: Path, version: int) -> LocalRelease:
    """Download a version's release folder into `target` atomically, verified before it is renamed."""
    with atomic_dir(target) as tmp:
        staging = tmp / ".download"
        staging.mkdir()
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging),
                                                           tracking_uri=uri))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; all mean "could not download"
            raise ReleaseError(f"v{version}: downloading {source} failed: {str(exc).splitlines()[0]}") from None
        for entry in got.iterdir():
            os.replace(entry, tmp / entry.name)
        shutil.rmtree(staging)
        load_release(tmp, version)  # raises before the rename when anything does not verify
    return load_release(target, version)


def _cached(target: Path, version: int) -> LocalRelease | None:
    if not (target / RELEASE_MANIFEST).is_file():
        return None
    try:
        return load_release(target, version)
    except ReleaseError:
        return None  # damaged cache: downloaded again, replacing it


def fetch_registered(params: Params, spec: RegistrySpec) -> LocalRelease:
    """A registered version's release folder under <stack.state_dir>/releases/v<N>/, downloaded once."""
    uri = required_tracking_uri(params, str(spec), ReleaseError, hint="; or pass a release folder")
    found = _model_version(uri, spec)
    version = int(found.version)
    target = Path(params.stack.state_dir) / "releases" / f"v{version}"
    cached = _cached(target, version)
    if cached is not None:
        return cached
    return _download(uri, str(found.source), target, version)


def resolve_release(spec: str, params: Params) -> LocalRelease:
    """The verified local release `spec` names: a version, an alias, a models:/ URI or a folder."""
    parsed = parse_spec(spec, params.evaluate.registered_model)
    if isinstance(parsed, Path):
        if not parsed.is_dir():
            raise ReleaseError(f"{spec}: not a release folder, a registered version number, an alias or a "
                               "models:/ URI")
        return load_release(parsed)
    return fetch_registered(params, parsed)
