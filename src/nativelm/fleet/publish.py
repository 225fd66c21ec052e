"""Pull mode on the controller: publish a signed release and the channel boards follow (docs/fleet-at-scale.md).

    releases/<release>/<file>          every file of the release, release.json.sig included; never changed
                                       once there (a name holding another release.json is refused)
    channels/<channel>.json (+ .sig)   which release each wave runs, paused or not; signed, serial + 1 each time
    status/<board>.json                each board's last report (written by the board)

The controller writes with its own credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the
environment, as MLflow and DVC use them; never logged); boards read `releases/` and `channels/`
anonymously. A publish costs the controller one upload of the release, whatever the fleet's size.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.errors import NativelmError
from nativelm.fleet.agent import CHANNEL_NAMESPACE, RELEASE_MANIFEST, AgentError
from nativelm.fleet.agent.channel import CHANNEL_FORMAT, parse_channel
from nativelm.fleet.signing import sign_manifest, signed

if TYPE_CHECKING:
    from nativelm.fleet.release import LocalRelease
    from nativelm.params.fleet import FleetParams, PullParams

SHA_META = "sha256"  # object metadata: the file's sha256, so a re-publish sends only what changed


class StoreError(NativelmError):
    """The object store refused or could not be reached: one line, the bucket and key named."""


@dataclass(frozen=True)
class Published:
    release: str
    channel: dict[str, Any]
    files_sent: int
    bytes_sent: int
    files_kept: int


def store_client(pull: PullParams) -> Any:
    """A boto3 S3 client for the store (path-style addressing, as MinIO serves it)."""
    import boto3  # here: `nativelm --help` and the push commands never load it
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=pull.endpoint, region_name=pull.region,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                                      connect_timeout=10, read_timeout=60))


def _fail(pull: PullParams, key: str, exc: Exception) -> StoreError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"store {pull.endpoint} bucket {pull.bucket}: {key}: {text}")


def _head(client: Any, pull: PullParams, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=pull.bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _get(client: Any, pull: PullParams, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=pull.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def store_call(pull: PullParams, key: str, work: Any) -> Any:
    """Run `work()`; what botocore raises becomes one StoreError line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return work()
    except (BotoCoreError, ClientError) as exc:
        raise _fail(pull, key, exc) from None


def upload_release(client: Any, pull: PullParams, release: LocalRelease) -> tuple[int, int, int]:
    """Every file of a signed release under releases/<name>/, skipping those already there: (sent, bytes, kept)."""
    base = f"releases/{release.name}/"
    manifest = store_call(pull, base + RELEASE_MANIFEST, lambda: _head(client, pull, base + RELEASE_MANIFEST))
    ours = release.files[RELEASE_MANIFEST].sha256
    if manifest is not None and manifest.get("Metadata", {}).get(SHA_META) != ours:
        raise StoreError(f"store bucket {pull.bucket}: {base} holds another release.json than {release.folder} "
                         "(a published release never changes; give it another name)")
    sent = size = kept = 0
    # release.json last: boards fetch it first, so a half-published release is never started
    for name in sorted(release.files, key=lambda n: (n == RELEASE_MANIFEST, n)):
        file, key = release.files[name], base + name
        there = store_call(pull, key, lambda key=key: _head(client, pull, key))
        if there is not None and there.get("Metadata", {}).get(SHA_META) == file.sha256:
            kept += 1
            continue
        with open(file.path, "rb") as body:
            store_call(pull, key, lambda key=key, body=body, file=file: client.put_object(
                Bucket=pull.bucket, Key=key, Body=body, Metadata={SHA_META: file.sha256}))
        sent, size = sent + 1, size + file.size
    return sent, size, kept


def read_channel(client: Any, pull: PullParams) -> dict[str, Any] | None:
    """The channel as published now (None: never published)."""
    key = f"channels/{pull.channel}.json"
    body = store_call(pull, key, lambda: _get(client, pull, key))
    if body is None:
        return None
    try:
        return parse_channel(json.loads(body), pull.channel)
    except (ValueError, AgentError) as exc:
        raise StoreError(f"store bucket {pull.bucket}: {key} cannot be read ({exc}); publish a release again") from None


def write_channel(client: Any, fleet: FleetParams, channel: dict[str, Any]) -> dict[str, Any]:
    """Sign and write a channel document (its signature first, then the document)."""
    pull = fleet.pull
    channel = parse_channel({**channel, "format": CHANNEL_FORMAT, "channel": pull.channel}, pull.channel)
    key = f"channels/{pull.channel}.json"
    body = json.dumps(channel, indent=1, sort_keys=True).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix="nativelm-channel-") as tmp:
        doc = Path(tmp) / "channel.json"
        doc.write_bytes(body)
        sig = sign_manifest(doc, Path(fleet.signing_key), Path(tmp) / "channel.json.sig", CHANNEL_NAMESPACE)
        for name, data in ((key + ".sig", sig.read_bytes()), (key, body)):
            store_call(pull, name, lambda name=name, data=data: client.put_object(
                Bucket=pull.bucket, Key=name, Body=data, ContentType="application/json"))
    return channel


def next_channel(old: dict[str, Any] | None, release: str, percent: float) -> dict[str, Any]:
    """The channel that ramps `release` to `percent` percent: the rest keep the release it replaces."""
    if old is None:
        return {"serial": 1, "paused": False, "release": release, "percent": percent, "previous": None}
    previous = old["previous"] if old["release"] == release else old["release"]
    return {"serial": old["serial"] + 1, "paused": False, "release": release, "percent": percent,
            "previous": previous}


def publish(release: LocalRelease, fleet: FleetParams, percent: float, client: Any = None) -> Published:
    """Upload `release` (signed) once and point the channel's first `percent` percent of boards at it."""
    client = client or store_client(fleet.pull)
    release = signed(release, Path(fleet.signing_key))
    sent, size, kept = upload_release(client, fleet.pull, release)
    channel = write_channel(client, fleet, next_channel(read_channel(client, fleet.pull), release.name, percent))
    return Published(release.name, channel, sent, size, kept)


def set_paused(fleet: FleetParams, paused: bool, client: Any = None) -> dict[str, Any]:
    """Pause (every board stays where it is) or resume the channel; a new serial either way."""
    client = client or store_client(fleet.pull)
    old = read_channel(client, fleet.pull)
    if old is None:
        raise StoreError(f"channel {fleet.pull.channel} was never published: nothing to "
                         f"{'pause' if paused else 'resume'} (`nativelm fleet publish --model ...`)")
    return write_channel(client, fleet, {**old, "paused": paused, "serial": old["serial"] + 1})
