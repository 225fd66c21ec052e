-- One database per service on the team stack's PostgreSQL.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
