"""A release fetched from the store into releases/<release>/, and the board's pull settings.

release.json and release.json.sig come first and the signature is checked before any other file
is fetched, so a tampered or foreign release costs two small requests. Files the board already
holds (in this release or, by hash, in another one) are not fetched again; a file cut off mid-way
resumes where it stopped (a Range request). The release is then verified by the agent's own
`verify` (every hash, the signature again, sealed read-only).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

from . import PART, RELEASE_MANIFEST, SIGNATURE, AgentError
from .files import JSON_LIMIT, Layout, listed_files, read_json
from .releases import cmd_discard, cmd_hashes, cmd_link, cmd_verify
from .signature import check_signature
from .store import Credentials, Store, StoreDown

CONFIG = "config.json"
CREDENTIALS = "credentials.json"
_ENDPOINT = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class PullConfig(NamedTuple):
    """pull/config.json, written by `nativelm fleet provision` when fleet.mode is pull."""

    endpoint: str
    bucket: str
    channel: str
    board: str
    region: str = "us-east-1"
    jitter_s: float = 0.0
    keep: int = 3
    heartbeat_s: float = 3600.0


def _field(data: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise AgentError(f"pull/{CONFIG}: bad {key}: {value!r} (allowed: {pattern.pattern})")
    return value


def _number(data: dict[str, Any], key: str, default: float, minimum: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value < 1e9:
        raise AgentError(f"pull/{CONFIG}: bad {key}: {value!r} (a number >= {minimum:g})")
    return float(value)


def read_config(lay: Layout) -> PullConfig:
    """This board's pull settings; one line naming what is wrong."""
    data = read_json(lay.pull / CONFIG)
    if data is None:
        raise AgentError(f"pull mode is not set up on this board: no pull/{CONFIG} "
                         "(`nativelm fleet provision` with fleet.mode: pull writes it)")
    if not isinstance(data, dict):
        raise AgentError(f"pull/{CONFIG}: not a JSON object")
    region = data.get("region", "us-east-1")
    if not isinstance(region, str) or not _NAME.fullmatch(region):
        raise AgentError(f"pull/{CONFIG}: bad region: {region!r}")
    return PullConfig(_field(data, "endpoint", _ENDPOINT), _field(data, "bucket", _BUCKET),
                      _field(data, "channel", _NAME), _field(data, "board", _NAME), region,
                      _number(data, "jitter_s", 0.0, 0), int(_number(data, "keep", 3, 1)),
                      _number(data, "heartbeat_s", 3600.0, 0))


def read_credentials(lay: Layout) -> Credentials | None:
    """The board's own store key (pull/credentials.json), None when it has none (status is then anonymous)."""
    data = read_json(lay.pull / CREDENTIALS)
    if data is None:
        return None
    if not (isinstance(data, dict) and isinstance(data.get("access_key"), str) and isinstance(data.get("secret_key"), str)):
        raise AgentError(f"pull/{CREDENTIALS}: needs \"access_key\" and \"secret_key\" strings")
    return Credentials(data["access_key"], data["secret_key"])


def open_store(lay: Layout, config: PullConfig) -> Store:
    return Store(config.endpoint, config.bucket, config.region, read_credentials(lay))


def _fetch_file(store: Store, lay: Layout, release: str, name: str) -> int:
    """One file of the release into releases/<release>/<name> (through NAME.part, then renamed)."""
    target = lay.release(release) / name
    part = target.with_name(name + PART)
    got = store.download(f"releases/{release}/{name}", part)
    os.replace(part, target)
    return got


def fetch_release(store: Store, lay: Layout, release: str) -> dict[str, int]:
    """Bring `release` onto the board, verified and sealed; {"bytes": fetched, "files": fetched, "copied": ...}.

    A release that does not verify is discarded (unless it is current or previous) and the error raised."""
    if (lay.release(release) / RELEASE_MANIFEST).is_file():
        try:
            cmd_verify(lay, release)
            return {"bytes": 0, "files": 0, "copied": 0}
        except AgentError:
            pass  # incomplete or damaged: fetched below
    have = cmd_hashes(lay, release)["files"]
    counts = {"bytes": 0, "files": 0, "copied": 0}
    try:
        for name in (RELEASE_MANIFEST, SIGNATURE):
            counts["bytes"] += _fetch_file(store, lay, release, name)
            counts["files"] += 1
        check_signature(lay, release)
        for name, sha in sorted(listed_files(lay, release).items()):
            if have.get(name) == sha:
                continue
            if cmd_link(lay, release, name, sha).get("linked"):
                counts["copied"] += 1
                continue
            counts["bytes"] += _fetch_file(store, lay, release, name)
            counts["files"] += 1
        cmd_verify(lay, release)
    except StoreDown:
        raise  # what arrived stays: the next poll resumes it
    except AgentError:
        discard_quietly(lay, release)
        raise
    return counts


def discard_quietly(lay: Layout, release: str) -> None:
    """Delete a refused release's folder; one that is current or previous stays (cmd_discard refuses)."""
    try:
        cmd_discard(lay, release)
    except (AgentError, OSError):
        pass


def read_small_json(body: bytes, what: str) -> Any:
    """A JSON document fetched from the store, bounded like every JSON file the agent reads."""
    if len(body) > JSON_LIMIT:
        raise AgentError(f"{what}: larger than {JSON_LIMIT} bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except RecursionError:
        raise AgentError(f"{what}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentError(f"{what}: not JSON ({exc})") from None
