"""Glue between Prefect flows, DVC stages and MLflow runs (the flows in pipelines/ stay thin)."""
