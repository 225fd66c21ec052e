"""The gate: a registered version becomes the `champion` only when it is at least as good as the current one.

`decide` holds the rule (pure), `promote` applies it to the MLflow registry.
"""
