"""The prep flow mapped over manifest slices on Prefect task runners: same index as one process."""

from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.io import read_jsonl

from tests.conftest import make_config


@pytest.fixture(scope="module")
def harness():
    """The session's ephemeral Prefect API (started once, on first use), named by PREFECT_API_URL in this
    module's settings so that the Dask workers' processes reach it too, as prefect_test_harness did with a
    server of its own (a second API start: seconds on a busy 2-core machine)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # the one Prefect's client starts for this process (a no-op when running)
    server.start(timeout=120)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _content(prep_dir: Path) -> dict:
    # The digest covers float bits, which change with how clips were batched through the VAE.
    return {
        r["key"]: {k: v for k, v in r.items() if k not in ("shard", "digest")}
        for r in read_jsonl(prep_dir / "samples.jsonl")
    }


def test_thread_slices_match_one_process_and_rerun_is_cached(
    tmp_path: Path, demo_manifest: Path, prepped: PipelineConfig, harness
) -> None:
    from flowspeed.flows.stages import prep

    single = prepped  # the session's one-process prep of the same data (run_prep on this manifest)
    cfg = make_config(tmp_path / "sliced", demo_manifest, "data.slices=3", "data.task_runner=thread")
    first = prep(cfg)
    assert first["num_samples"] == 8 and first["cache_hit"] is False and first["world_size"] == 3
    assert _content(cfg.prep_dir) == _content(single.prep_dir)
    names = {p.name[:4] for p in (cfg.cache_dir / "shards").glob("*.safetensors")}
    assert names == {"r000", "r001", "r002"}
    again = prep(cfg)
    assert again["cache_hit"] is True and again["num_samples"] == 8


@pytest.mark.slow
def test_dask_local_cluster_runs_the_slices(
    tmp_path: Path, demo_manifest: Path, prepped: PipelineConfig, harness
) -> None:
    from flowspeed.flows.stages import prep_slices
    from flowspeed.tasks.stages import make_task_runner

    single = prepped  # the session's one-process prep of the same data (run_prep on this manifest)
    cfg = make_config(tmp_path / "dask", demo_manifest, "data.slices=2", "data.task_runner=dask")
    runner = make_task_runner(cfg)
    assert type(runner).__name__ == "DaskTaskRunner"
    out = prep_slices.with_options(task_runner=runner)(cfg)
    assert out["num_samples"] == 8 and out["world_size"] == 2
    assert _content(cfg.prep_dir) == _content(single.prep_dir)


def test_a_missing_cluster_runner_says_what_to_install(tmp_path: Path, demo_manifest: Path) -> None:
    from flowspeed.tasks.stages import make_task_runner

    with pytest.raises(ValueError, match=r"pip install 'flowspeed\[ray\]'"):
        make_task_runner(make_config(tmp_path, demo_manifest, "data.slices=2", "data.task_runner=ray"))
