"""Everything MLflow, in one place: the training tracker (`tracker`), run ownership and outage
recovery (`runs`), the model registry and its gates (`registry`), the pyfunc flavor that serves an
export (`serving`) and run comparison (`compare`). Plain library code: the Prefect tasks that use
it live in `tasks/tracking.py` and `tasks/registry.py`."""
