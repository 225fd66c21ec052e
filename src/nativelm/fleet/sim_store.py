"""Pull mode's simulation: a local S3-compatible object store (moto's server) and local board roots.

moto[server] (a dev dependency, pinned in pyproject.toml) stands in for the team stack's MinIO
(docker-compose.yml) because Docker is not available here: it serves the real S3 HTTP API
(path-style buckets, ETags, conditional and Range GETs, SigV4-signed writes) on a loopback port.
The bucket gets the policy docs/fleet-at-scale.md gives MinIO: anonymous reads of `releases/` and
`channels/` only. A simulated pulled board is a folder laid out as provisioning leaves a board
(the agent zipapp, allowed_signers, pull/config.json, its own store key), whose runtime virtualenv
is a wrapper around this machine's Python (it has the runtime's pinned packages).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.fleet.agent import AGENT_NAME
from nativelm.fleet.agent_pack import agent_bytes
from nativelm.fleet.provision import pull_config
from nativelm.fleet.signing import allowed_signers_text
from nativelm.stack.process import port_in_use

if TYPE_CHECKING:
    from nativelm.params.fleet import FleetParams

READY_S = 60.0
# moto accepts any key; boto3 needs one to sign with (the real store's keys come from the environment)
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "nativelm-test", "AWS_SECRET_ACCESS_KEY": "nativelm-test-secret"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_store(port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto S3 server on 127.0.0.1 for the block: (endpoint URL, its process); stopped after."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_S
        while not port_in_use("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server on port {port} did not start (exit status {process.poll()})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_policy(bucket: str) -> str:
    """Anonymous GetObject on releases/* and channels/*: what boards read; status/ stays private."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": ["*"]}, "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{bucket}/releases/*", f"arn:aws:s3:::{bucket}/channels/*"]}]})


def create_fleet_bucket(client: Any, bucket: str) -> None:
    """The fleet bucket with the boards' read policy (idempotent)."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket=bucket, Policy=read_policy(bucket))


def use_test_credentials() -> None:
    """Give boto3 the stand-in store's keys unless the environment has some."""
    for name, value in TEST_CREDENTIALS.items():
        os.environ.setdefault(name, value)


def runtime_wrapper(venv: Path, python: str = sys.executable) -> Path:
    """venv/bin/python as a wrapper running `python` (a symlink would lose that interpreter's packages)."""
    wrapper = venv / "bin" / "python"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def make_pull_board(root: Path, fleet: FleetParams, name: str = "board-1") -> Path:
    """A board's agent root as `nativelm fleet provision` leaves it in pull mode, plus the board's own store key."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "bin" / AGENT_NAME).write_bytes(agent_bytes())
    (root / "keys").mkdir(exist_ok=True)
    (root / "keys" / "allowed_signers").write_text(allowed_signers_text(fleet.allowed_signers))
    (root / "pull").mkdir(exist_ok=True)
    (root / "pull" / "config.json").write_text(json.dumps(pull_config(fleet, name)))
    secret = root / "pull" / "credentials.json"  # the board's own key: it may write status/<board>.json only
    secret.write_text(json.dumps({"access_key": name, "secret_key": f"{name}-secret"}))
    secret.chmod(0o600)
    runtime_wrapper(root / "venv")
    return root
