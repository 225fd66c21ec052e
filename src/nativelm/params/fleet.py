"""Parameters of the fleet: where the inventory is, how to talk to boards, how a rollout proceeds."""

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel

# Names of boards, groups and releases reach remote shells: keep them to a strict alphabet.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RELEASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SimParams(StrictModel):
    """The simulated fleet: real OpenSSH sshd processes on loopback ports, one per board."""

    boards: int = Field(3, ge=1, le=64)
    canary: int = Field(1, ge=0, le=64)
    base_port: int = Field(2220, ge=1024, le=65000)
    dir: str = Field(".nativelm/fleet-sim", min_length=1)

    @model_validator(mode="after")
    def _canary_fits(self) -> "SimParams":
        if self.canary > self.boards:
            raise ValueError(f"canary ({self.canary}) is more than boards ({self.boards})")
        return self


class FleetParams(StrictModel):
    """Inventory location, SSH limits, rollout shape and the board runtime's packages."""

    inventory: str = Field(".nativelm/fleet-sim/fleet.yaml", min_length=1)
    remote_root: str = Field("nativelm", pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,127}$")
    keep_releases: int = Field(3, ge=1, le=100)
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    command_timeout_s: float = Field(300.0, gt=0, le=7200)
    keepalive_s: int = Field(15, ge=0, le=3600)
    max_parallel: int = Field(4, ge=1, le=256)
    max_failed_boards: int = Field(0, ge=0)
    lock_stale_s: float = Field(3600.0, gt=0)
    verify_full_every_s: float = Field(86400.0, ge=0)
    runtime_packages: list[str] = Field(
        default_factory=lambda: ["onnxruntime==1.32.0", "numpy==2.4.6", "tokenizers==0.23.3"], min_length=1)
    bench_prompt_len: int = Field(64, ge=1, le=8192)
    bench_new_tokens: int = Field(32, ge=1, le=8192)
    bench_repeats: int = Field(3, ge=1, le=100)
    sim: SimParams = SimParams()
