# MLflow tracking server for the team stack: PostgreSQL backend (psycopg2: name the driver in the
# URI, postgresql+psycopg2://, since SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3),
# S3-compatible artifact store (boto3).
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.40.0
EXPOSE 5000
