"""Shared fixtures: a small demo dataset and a prepped cache, made once per session.

Environment first: these must be set before Prefect, MLflow or HF libraries are imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="flowspeed-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["FLOWSPEED_SAMPLES"] = "0"  # no checkpoint samples unless a test asks (tracking.samples)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402
from flowspeed.configs import PipelineConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowspeed.datasets_prep.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_videos=6, num_images=2)


def make_config(workdir: Path, manifest: Path, *overrides: str, check: bool = True) -> PipelineConfig:
    """The quickstart config on `manifest`; `check=False` skips the load-time checks (a test of a
    later stage's own refusal)."""
    return load_config(QUICKSTART, [f"data.manifest={manifest}", *overrides], workdir=workdir, check=check)


def on_prepped(workdir: Path, prepped: PipelineConfig, *overrides: str) -> PipelineConfig:
    """The quickstart config in `workdir` that reads `prepped`'s prep and cache folders: a training test that needs
    no prep of its own."""
    return make_config(workdir, prepped.data.manifest, f"data.output_dir={prepped.prep_dir}",
                       f"data.cache_dir={prepped.cache_dir}", *overrides)  # fmt: skip


@pytest.fixture(scope="session")
def prepped(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> PipelineConfig:
    """A workdir whose prep stage has run on the demo data (read-only for the tests that use it)."""
    from flowspeed.datasets_prep.prep import run_prep

    cfg = make_config(
        tmp_path_factory.mktemp("prepped"), demo_manifest, "train.max_steps=6", "train.checkpoint_every=3"
    )
    run_prep(cfg)
    return cfg


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, its schema made by MLflow's own migrations (seconds per new database on a
    CPU), made once: `shutil.copyfile(mlflow_db, workdir / "mlflow.db")` gives a workdir the store its first
    run would create there (the default tracking URI), without running them again."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session", autouse=True)
def _no_flow_heartbeats() -> object:
    """The flows tests run in-process report to Prefect's ephemeral API, which dies with pytest: like
    the CLI against its embedded API (`tasks.embedded_prefect.flow_settings`), they send no heartbeats,
    which nothing could read and whose thread every flow's end waits on (up to 1 s per flow run)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
