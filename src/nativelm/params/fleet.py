"""Parameters of the fleet: where the inventory is, how to talk to boards, how a rollout proceeds."""

import posixpath
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from nativelm.params.base import StrictModel

# Names of boards, groups and releases reach remote shells: keep them to a strict alphabet.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RELEASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# a remote folder: plain components of a shell-safe alphabet, optionally after `/` or `~/`
_REMOTE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")


def remote_root_error(value: str) -> str | None:
    """Why `value` cannot be a board's remote root (None: it can). Relative and `~/...` are under the
    board's home, `/...` is absolute; no `.`/`..` or empty components, nothing a shell would expand."""
    body = value[2:] if value.startswith("~/") else value[1:] if value.startswith("/") else value
    if not body or len(value) > 128:
        return "must name a folder of at most 128 characters"
    bad = [part for part in body.split("/") if not _REMOTE_PART.fullmatch(part)]
    if bad:
        return (f"component {bad[0]!r} is not a plain folder name (letters, digits, '._-'; no '.', '..', empty "
                f"parts or shell characters)")
    return None


class SimParams(StrictModel):
    """The simulated fleet: real OpenSSH sshd processes on loopback ports, one per board."""

    boards: int = Field(3, ge=1, le=64)
    canary: int = Field(1, ge=0, le=64)
    base_port: int = Field(2220, ge=1024, le=65000)
    dir: str = Field(".nativelm/fleet-sim", min_length=1)
    # the last `arm64` boards run Debian's arm64 userland under qemu-user, built once into arm64_rootfs
    arm64: int = Field(0, ge=0, le=64)
    arm64_rootfs: str = Field(".nativelm/arm64-rootfs", min_length=1)

    @model_validator(mode="after")
    def _canary_fits(self) -> "SimParams":
        if self.canary > self.boards:
            raise ValueError(f"canary ({self.canary}) is more than boards ({self.boards})")
        if self.arm64 > self.boards:
            raise ValueError(f"arm64 ({self.arm64}) is more than boards ({self.boards})")
        return self


class PullParams(StrictModel):
    """Pull mode (docs/fleet-at-scale.md): the object store boards poll, and how often.

    The controller's store credentials come from the environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, as for MLflow and DVC), never from here; boards read anonymously.
    """

    endpoint: str = Field("http://localhost:9000", pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")
    bucket: str = Field("fleet", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    channel: str = Field("stable", pattern=NAME_PATTERN)
    region: str = Field("us-east-1", pattern=NAME_PATTERN)
    poll_s: float = Field(900.0, ge=10, le=7 * 86400)
    jitter_s: float = Field(600.0, ge=0, le=7 * 86400)
    heartbeat_s: float = Field(3600.0, ge=0, le=30 * 86400)

    @property
    def silent_after_s(self) -> float:
        """The longest a working board goes without a report: a heartbeat, a poll period and its jitter."""
        return self.heartbeat_s + self.poll_s + self.jitter_s


class FleetParams(StrictModel):
    """Inventory location, SSH limits, rollout shape and the board runtime's packages."""

    inventory: str = Field(".nativelm/fleet-sim/fleet.yaml", min_length=1)
    mode: Literal["push", "pull"] = "push"
    remote_root: str = Field("nativelm", min_length=1)
    keep_releases: int = Field(3, ge=1, le=100)
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    command_timeout_s: float = Field(300.0, gt=0, le=7200)
    keepalive_s: int = Field(15, ge=0, le=3600)
    max_parallel: int = Field(4, ge=1, le=256)
    max_failed_boards: int = Field(0, ge=0)
    max_failed_percent: float = Field(100.0, ge=0, le=100)
    waves: list[int] | None = Field(None, min_length=1, max_length=100)
    wave_pause_s: float = Field(0.0, ge=0, le=86400)
    gate_max_slowdown: float | None = Field(None, gt=0, lt=1)
    board_deadline_s: float | None = Field(None, gt=0, le=86400)
    lock_stale_s: float = Field(3600.0, gt=0)
    verify_full_every_s: float = Field(86400.0, ge=0)
    runtime_packages: list[str] = Field(
        default_factory=lambda: ["onnxruntime==1.32.0", "numpy==2.4.6", "tokenizers==0.23.3"], min_length=1)
    # release signing (docs/fleet.md): the controller's private key (never logged) and the public
    # keys boards accept (several while a key rotates); `fleet sim up` creates the default key
    signing_key: str = Field(".nativelm/fleet-sim/release-signing-key", min_length=1)
    allowed_signers: list[str] = Field(
        default_factory=lambda: [".nativelm/fleet-sim/release-signing-key.pub"], min_length=1)
    bench_prompt_len: int = Field(64, ge=1, le=8192)
    bench_new_tokens: int = Field(32, ge=1, le=8192)
    bench_repeats: int = Field(3, ge=1, le=100)
    sim: SimParams = SimParams()
    pull: PullParams = PullParams()

    @field_validator("remote_root")
    @classmethod
    def _remote_root(cls, value: str) -> str:
        problem = remote_root_error(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: list[int] | None) -> list[int] | None:
        """Cumulative percents of the non-canary boards: rising, each in 1..100, the last one 100."""
        if value is None:
            return None
        if any(not 1 <= p <= 100 for p in value) or any(b <= a for a, b in zip(value, value[1:])) \
                or value[-1] != 100:
            raise ValueError(f"{value} must be rising cumulative percents in 1..100 ending at 100 (e.g. [10, 50, 100])")
        return value

    def remote_root_under(self, home: str) -> str:
        """The absolute remote root on a board whose home folder is `home`."""
        if self.remote_root.startswith("/"):
            return posixpath.normpath(self.remote_root)
        return posixpath.join(home, self.remote_root.removeprefix("~/").rstrip("/"))
