"""The board's side of the object store (S3 API, path-style URLs), standard library only.

Reads are plain GETs: the store serves `releases/` and `channels/` to anonymous readers (everything
there is signed and hash-checked on the board, see docs/fleet-at-scale.md). The one write, the
board's own `status/<board>.json`, is signed with AWS Signature Version 4 by the board's own key
(pull/credentials.json), which the store's policy lets write that object and nothing else. A store
that cannot be reached is `StoreDown`: the board keeps serving what it has.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, NamedTuple

from . import AgentError

# urllib.request (about 30 ms to import) is imported where a request is made: every other agent
# command, each one an SSH round trip of a push rollout, starts without it

TIMEOUT_S = 30
CHUNK = 1 << 20


class StoreDown(AgentError):
    """The store did not answer (refused, timed out, a server error): try again at the next poll."""


class Credentials(NamedTuple):
    """A board's own access key (never printed: repr hides the secret)."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return f"Credentials(access_key={self.access_key!r}, secret_key=...)"


class Reply(NamedTuple):
    status: int
    body: bytes
    etag: str | None


def signing_key(secret: str, day: str, region: str) -> bytes:
    """SigV4's derived key for one day, region and the s3 service."""
    key = ("AWS4" + secret).encode("utf-8")
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sigv4_headers(method: str, url: str, body: bytes, credentials: Credentials, region: str,
                  now: datetime.datetime | None = None) -> dict[str, str]:
    """The headers that sign one request without a query string (AWS Signature Version 4, service s3)."""
    parts = urllib.parse.urlsplit(url)
    moment = now or datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - boards run Python 3.9+
    stamp = moment.strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    names = ";".join(sorted(headers))
    canonical = "\n".join([method, parts.path or "/", "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                           names, payload])
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    signature = hmac.new(signing_key(credentials.secret_key, stamp[:8], region), to_sign.encode("utf-8"),
                         hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
    return {"x-amz-content-sha256": payload, "x-amz-date": stamp, "Authorization": auth}


class Store:
    """One bucket of an S3-compatible store, and how much this poll asked of it (requests, bytes)."""

    def __init__(self, endpoint: str, bucket: str, region: str = "us-east-1",
                 credentials: Credentials | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.endpoint, self.bucket, self.region = endpoint.rstrip("/"), bucket, region
        self.credentials, self.timeout_s = credentials, timeout_s
        self.requests = 0
        self.bytes_in = 0

    def url(self, key: str) -> str:
        return f"{self.endpoint}/{urllib.parse.quote(self.bucket)}/{urllib.parse.quote(key)}"

    def _open(self, request: Any, key: str) -> Any:
        """urlopen, with what went wrong as one line: StoreDown when the store is not there."""
        import urllib.error
        import urllib.request

        self.requests += 1
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 - http(s) only, see read_config
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return exc
            if exc.code >= 500:
                raise StoreDown(f"store error {exc.code} for {key}") from None
            if exc.code == 404:
                raise AgentError(f"the store has no {key}") from None
            raise AgentError(f"the store refused {key} (HTTP {exc.code})") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise StoreDown(f"store {self.endpoint} unreachable: {why}") from None

    def get(self, key: str, limit: int, etag: str | None = None) -> Reply:
        """A small object (at most `limit` bytes); status 304 and no body when it still has `etag`."""
        headers = {"If-None-Match": etag} if etag else {}
        with self._open(_request(self.url(key), headers), key) as answer:
            status = answer.status if hasattr(answer, "status") else answer.code
            body = b"" if status == 304 else answer.read(limit + 1)
            if len(body) > limit:
                raise AgentError(f"{key} in the store is larger than {limit} bytes")
            self.bytes_in += len(body)
            return Reply(status, body, answer.headers.get("ETag"))

    def download(self, key: str, part: Path) -> int:
        """Fetch `key` into `part`, resuming after the bytes it holds already; return the bytes fetched."""
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        got = 0
        with self._open(_request(self.url(key), headers), key) as answer:
            resumed = have and answer.status == 206
            with open(part, "ab" if resumed else "wb") as out:
                for block in iter(lambda: answer.read(CHUNK), b""):
                    out.write(block)
                    got += len(block)
                out.flush()
                os.fsync(out.fileno())
        self.bytes_in += got
        return got

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> None:
        """Write one object, signed with the board's key (anonymous when it has none)."""
        url = self.url(key)
        headers = {"Content-Type": content_type}
        if self.credentials is not None:
            headers.update(sigv4_headers("PUT", url, body, self.credentials, self.region))
        with self._open(_request(url, headers, body, "PUT"), key):
            pass


def _request(url: str, headers: dict[str, str], body: bytes | None = None, method: str = "GET") -> Any:
    import urllib.request

    return urllib.request.Request(url, data=body, method=method, headers=headers)
