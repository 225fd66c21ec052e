"""MLflow model registry conventions: releases are registered as versions of one model name."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from nativelm.tracking.runs import RunLogger


def register_folder(logger: RunLogger, folder: Path, name: str, tags: dict[str, str],
                    artifact_path: str = "release") -> int:
    """Log `folder` as the run's `artifact_path` artifacts and register it as a new version of `name`.

    A plain artifact folder (no MLflow model flavour): the registry version points at it by URI.
    """
    client, run_id = logger.client, logger.run_id
    logger.log_artifacts(folder, artifact_path)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="nativelm releases: export folder + board runtime")
        except MlflowException:  # created concurrently
            client.get_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return int(version.version)
