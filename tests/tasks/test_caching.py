from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.tasks.caching import files_policy, run_cached
from flowspeed.tasks.stages import prep_latents
from prefect import task


@pytest.fixture(scope="module")
def harness():
    """The session's ephemeral Prefect API (started once, on first use), named by PREFECT_API_URL in this
    module's settings, where prefect_test_harness started a second server (seconds on a busy 2-core machine).
    Cache records do not depend on it: every test here caches into paths of its own tmp_path."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # the one Prefect's client starts for this process (a no-op when running)
    server.start(timeout=120)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def test_cache_key_follows_inputs_and_sources_not_run_ids(tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text("a")
    policy = files_policy(sources=lambda i: [src], exclude=("run_id",))
    cfg = PipelineConfig(workdir=tmp_path)
    key = policy.compute_key(None, {"cfg": cfg, "run_id": "r1"}, {})
    assert policy.compute_key(None, {"cfg": cfg, "run_id": "r2"}, {}) == key  # run id does not matter
    other = PipelineConfig(workdir=tmp_path, train={"max_steps": 99})
    assert policy.compute_key(None, {"cfg": other, "run_id": "r1"}, {}) != key
    src.write_text("a")  # rewritten with the same bytes: still the same source
    assert policy.compute_key(None, {"cfg": cfg, "run_id": "r1"}, {}) == key
    src.write_text("changed source")
    assert policy.compute_key(None, {"cfg": cfg, "run_id": "r1"}, {}) != key


def test_a_deleted_output_is_recomputed_not_replayed(tmp_path: Path, harness: None) -> None:
    out = tmp_path / "out.txt"
    calls = []

    @task(persist_result=True, cache_policy=files_policy(outputs=lambda i: [out]))
    def produce(tag: str) -> dict:
        calls.append(tag)
        out.write_text(tag)
        return {"path": str(out)}

    first = run_cached(produce, tag="x")
    second = run_cached(produce, tag="x")
    assert (first["cache_hit"], second["cache_hit"]) == (False, True) and calls == ["x"]
    out.unlink()
    third = run_cached(produce, tag="x")
    assert third["cache_hit"] is False and calls == ["x", "x"] and out.read_text() == "x"


def test_prep_task_logic_runs_without_an_orchestrator(tmp_path: Path, demo_manifest: Path) -> None:
    from tests.conftest import make_config

    res = prep_latents.fn(make_config(tmp_path, demo_manifest))
    assert res["num_samples"] == 8 and Path(res["samples"]).is_file()


def test_bad_input_fails_at_once_while_transient_errors_are_retried(harness: None) -> None:
    from flowspeed.tasks.caching import retry_if_transient
    from prefect import flow, task

    attempts = {"user": 0, "checkpoint": 0, "io": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def user_error() -> None:
        attempts["user"] += 1
        raise ValueError("data.num_frames must be 4k+1")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def checkpoint_error() -> None:  # a RuntimeError, as a damaged checkpoint or a rank's failure is
        from flowspeed.engines.common.safe_load import CheckpointError

        attempts["checkpoint"] += 1
        raise CheckpointError("could not load checkpoint step-00000010 (rank 0: RuntimeError: Missing key)")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
    def flaky_io() -> str:
        attempts["io"] += 1
        if attempts["io"] < 3:
            raise ConnectionError("tracking server busy")
        return "ok"

    @flow
    def both() -> str:
        assert user_error(return_state=True).is_failed()
        assert checkpoint_error(return_state=True).is_failed()
        return flaky_io()

    assert both() == "ok"
    assert attempts == {"user": 1, "checkpoint": 1, "io": 3}


@pytest.mark.slow
def test_a_rerun_after_a_failed_stage_does_only_that_stage(tmp_path: Path, demo_manifest: Path) -> None:
    """Eval fails (its output path is taken by a file: a full or broken disk looks the same); prep and
    train finished. Running the flow again, as a Prefect retry of the flow run does, reuses both."""
    from flowspeed.flows.pipeline import pipeline

    from tests.conftest import make_config

    cfg = make_config(tmp_path / "w", demo_manifest, "train.max_steps=2", "train.checkpoint_every=2",
                      "model.max_text_length=32", 'eval.prompts=["a red circle"]',
                      "eval.num_inference_steps=1")  # fmt: skip
    cfg.eval_dir.parent.mkdir(parents=True)
    cfg.eval_dir.write_text("not a folder")
    with pytest.raises(Exception, match="eval"):
        pipeline(cfg)
    assert (cfg.train_dir / "final" / "model_index.json").is_file()
    cfg.eval_dir.unlink()
    out = pipeline(cfg)
    assert out["prep"]["cache_hit"] and out["train"]["cache_hit"]
    assert not out["eval"]["cache_hit"] and (cfg.eval_dir / "metrics.json").is_file()


def test_a_cached_prep_whose_outputs_another_manifest_rewrote_is_rerun(
    tmp_path: Path, demo_manifest: Path, harness: None
) -> None:
    """Prep on A, then on B (one explicit prep folder), then on A again: A's cache key matches, but
    samples.jsonl holds B's rows; replaying the entry would train on B's data while reporting A's counts.
    (The default folders are keyed by the data section, so there each manifest has its own.)"""
    from tests.conftest import make_config

    rows = demo_manifest.read_text().splitlines()
    part = demo_manifest.with_name(f"part-{tmp_path.name}.jsonl")  # beside the media its paths name
    part.write_text("\n".join(rows[:3]) + "\n")
    assert make_config(tmp_path, demo_manifest).prep_dir != make_config(tmp_path, part).prep_dir
    shared = f"data.output_dir={tmp_path / 'prep'}"
    try:
        full, small = make_config(tmp_path, demo_manifest, shared), make_config(tmp_path, part, shared)
        assert run_cached(prep_latents, cfg=full)["num_samples"] == 8
        assert run_cached(prep_latents, cfg=small)["num_samples"] == 3
        again = run_cached(prep_latents, cfg=full)
    finally:
        part.unlink()
    samples = (full.prep_dir / "samples.jsonl").read_text().splitlines()
    assert again["num_samples"] == len(samples) == 8 and not again["cache_hit"]
    assert again["num_encoded"] == 0  # the rerun reuses the latent cache: only the sample list is rewritten
