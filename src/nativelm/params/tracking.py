"""Parameters of MLflow tracking."""

from pydantic import Field

from nativelm.params.base import StrictModel


class TrackingParams(StrictModel):
    """Which MLflow server to log to and under which experiment."""

    uri: str = Field("auto", min_length=1)
    experiment: str = Field("nativelm", min_length=1, max_length=200)
