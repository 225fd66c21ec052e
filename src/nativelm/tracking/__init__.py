"""MLflow conventions: which server, one parent run per pipeline run, one nested run per stage."""
