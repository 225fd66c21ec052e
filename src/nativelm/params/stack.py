"""Parameters of the local stack (MLflow + Prefect servers as background processes)."""

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel


class StackParams(StrictModel):
    """Where the local stack keeps its state and which loopback ports it serves on."""

    state_dir: str = Field(".nativelm", min_length=1)
    host: str = Field("127.0.0.1", pattern=r"^[A-Za-z0-9.\-:]+$")
    mlflow_port: int = Field(5000, ge=1024, le=65535)
    prefect_port: int = Field(4200, ge=1024, le=65535)
    start_timeout_s: float = Field(180.0, gt=0, le=3600)
    # seconds `stack down` waits for a server to exit after SIGTERM before it sends SIGKILL
    stop_timeout_s: float = Field(20.0, gt=0, le=600)

    @model_validator(mode="after")
    def _distinct_ports(self) -> "StackParams":
        if self.mlflow_port == self.prefect_port:
            raise ValueError(f"mlflow_port and prefect_port are both {self.mlflow_port}; give each server its own port")
        return self
