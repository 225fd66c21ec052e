"""Parameters of `nativelm serve` (the dashboard's deployments and their runner) and `nativelm run`."""

from pydantic import Field

from nativelm.params.base import StrictModel


class ServeParams(StrictModel):
    """How the deployments are served and how long `nativelm run` waits for the loop."""

    limit: int = Field(3, ge=1, le=64)  # flow runs the runner executes at once
    # retrain runs at once (each in its own DVC workspace); more only help with cores to spare
    retrain_concurrency: int = Field(1, ge=1, le=16)
    fleet_health_every_min: float = Field(15.0, ge=0.0, le=10080.0)  # 0: fleet-health has no schedule
    ready_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)  # `serve --background` waits this long
    # `nativelm run`: how long to wait for the retrain run, then for the rollout it triggers
    retrain_timeout_s: float = Field(7200.0, gt=0.0)
    rollout_timeout_s: float = Field(1800.0, gt=0.0)
