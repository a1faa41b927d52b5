"""Prefect tasks: the libraries' stage functions with retries, cache policies and MLflow logging."""
