"""Parameters of MLflow tracking."""

from pydantic import Field

from nativelm.params.base import StrictModel


class TrackingParams(StrictModel):
    """Which MLflow server to log to and under which experiment."""

    uri: str = Field("auto", min_length=1)
    experiment: str = Field("nativelm", min_length=1, max_length=200)
    # training runs sample CPU, memory (and GPU where present) this often as MLflow system metrics; 0: off
    system_metrics_every_s: float = Field(10.0, ge=0.0, le=3600.0)
