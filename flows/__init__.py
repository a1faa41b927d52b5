"""Prefect flows (prep, train, evaluate, pipeline) and the `flowspeed` CLI that runs them."""
