"""`nativelm study`: native training against compressing afterwards, on the project's own data."""
