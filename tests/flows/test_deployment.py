"""prefect.yaml is valid: every deployment's parameters validate as a config, the nightly one is paused, the
work pool is Prefect's default (`local` unless the environment names another), the recipe deployment's form
offers the runnable recipes as a dropdown; and what deployed runs show: MLflow links at the configured UI
address, config descriptions whose placeholders survive the UI's markdown, a torchrun rank's progress lines
in the launching process's log.

Deploying it to a real (PostgreSQL-backed) Prefect server and running it on a process worker, the recipe
deployment included, is in tests/flows/test_team_mode.py."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flowspeed.configs import ConfigError, PipelineConfig

from tests.conftest import REPO


def test_every_deployment_has_a_valid_config_and_the_nightly_one_is_paused() -> None:
    import importlib

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"flowspeed-pipeline", "flowspeed-recipe", "flowspeed-prep", "flowspeed-train",
                         "flowspeed-evaluate", "flowspeed-nightly-finetune", "flowspeed-post-train"}  # fmt: skip
    for dep in deps.values():
        module, func = dep["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        assert hasattr(importlib.import_module(module.replace(".py", "")), func), dep["entrypoint"]
        pool = dep["work_pool"]
        assert "name" not in pool, "a named pool here would beat PREFECT_DEFAULT_WORK_POOL_NAME for `deploy --all`"
        env = pool["job_variables"]["env"]
        assert env["PREFECT_FLOWS_DEFAULT_RETRIES"] == "1" and env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "flowspeed"
        if "cfg" in dep["parameters"]:
            cfg = PipelineConfig.model_validate(dep["parameters"]["cfg"])  # the run form's defaults validate
            assert cfg.model.family == ("qwen2_vl" if dep["name"] == "flowspeed-post-train" else "cogvideox")
    nightly = deps["flowspeed-nightly-finetune"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is False
    cfg = PipelineConfig.model_validate(nightly["parameters"]["cfg"])
    assert cfg.train.init_from == "champion" and cfg.tracking.registry.enabled and cfg.data.incoming
    assert deps["flowspeed-recipe"]["parameters"] == {"recipe": "quickstart", "overrides": []}
    # post-training: weekly, paused like the nightly finetune; its config is one the post-train flow accepts
    from flowspeed.configs.validate import config_problems
    from flowspeed.flows.post_train import post_train_problems

    post = deps["flowspeed-post-train"]
    (schedule,) = post["schedules"]
    assert schedule["cron"].split()[2:] == ["*", "*", "0"] and schedule["active"] is False  # Sundays
    cfg = PipelineConfig.model_validate(post["parameters"]["cfg"])
    assert post_train_problems(cfg) == [] and config_problems(cfg) == []
    assert [(g.metric, g.direction, g.min_improvement) for g in cfg.tracking.registry.gates] == [
        ("eval/reward", "higher", 0.02)]  # fmt: skip


def test_the_work_pool_is_local_unless_the_environment_names_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `prefect deploy` (`--all` included) fills in for the pool prefect.yaml leaves unnamed: prefect.toml
    here, beaten by the environment (a `{{ $VAR }}` placeholder could not default: unset, it stays as text)."""
    from prefect.settings import Settings

    monkeypatch.chdir(REPO)
    for var in ("PREFECT_DEFAULT_WORK_POOL_NAME", "PREFECT_DEPLOYMENTS_DEFAULT_WORK_POOL_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert Settings().deployments.default_work_pool_name == "local"
    monkeypatch.setenv("PREFECT_DEFAULT_WORK_POOL_NAME", "gpu-pool")
    assert Settings().deployments.default_work_pool_name == "gpu-pool"


def test_the_recipe_deployment_offers_the_runnable_recipes_and_takes_overrides(demo_manifest: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    from flowspeed.flows.recipe_flow import recipe_config, run_recipe
    from flowspeed.flows.summary import summary_rows
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(run_recipe).model_dump()["properties"]
    names = props["recipe"]["enum"]  # an enum: the run form's dropdown
    assert {"quickstart", "sd3-quickstart", "flux-t2i", "published/opensora-v1.2"} <= set(names)
    assert not [n for n in names if n.startswith("eval/")] and props["recipe"]["default"] == "quickstart"
    assert props["overrides"]["type"] == "array" and props["overrides"]["items"] == {"type": "string"}

    cfg = recipe_config("sd3-quickstart", [f"data.manifest={demo_manifest}", "train.max_steps=7"], str(tmp_path))
    assert (cfg.model.family, cfg.train.max_steps, cfg.workdir, cfg.tracking.recipe) == (
        "sd3", 7, tmp_path, "sd3-quickstart")  # fmt: skip
    with pytest.raises(ConfigError, match="train.max_stepz"):  # refused before any work, naming the key
        recipe_config("sd3-quickstart", [f"data.manifest={demo_manifest}", "train.max_stepz=7"])
    with pytest.raises(ConfigError, match="does not exist|not found|missing"):  # a path the run would read
        recipe_config("sd3-quickstart", [f"data.manifest={tmp_path / 'none.jsonl'}"])

    prep = {
        "num_samples": 5,
        "num_encoded": 3,
        "num_cached": 2,
        "num_rejected": 1,
        "rejected_by_reason": {"short": 1},
        "rejects": "r.jsonl",
        "clips_per_s": 2.0,
        "frames_per_s": 18.0,
        "reused_from_run": "p0",
    }
    train = {"losses": [2.0, 1.5], "samples_per_s": 3.25, "checkpoint": "c", "final_dir": "f", "cache_hit": False,
             "reused_from_run": "t0"}  # fmt: skip
    out = {"mlflow_run_id": "abc", "prep": prep, "train": train,
           "eval": {"metrics": {"eval/val_loss": 1.25}, "videos": ["v.mp4"]}}  # fmt: skip
    rows = dict(summary_rows(out))
    assert rows["samples"] == "5 (3 encoded, 2 cached, 1 rejected -> r.jsonl)" and rows["rejected"] == "short: 1"
    assert rows["loss"] == "2.0000 -> 1.5000 over 2 steps" and rows["throughput"] == "3.2 samples/s"
    assert rows["eval/val_loss"] == "1.2500" and "reused" not in rows and "prep speed" in rows
    hits = {"prep": prep | {"cache_hit": True}, "train": train | {"cache_hit": True}}
    reused = dict(summary_rows(out | hits))  # an earlier run's figures say so, and which run
    assert reused["reused"].startswith("prep, train") and "reused from run t0: nothing trained" in reused["loss"]
    assert "reused from run p0: nothing probed or encoded" in reused["samples"]
    assert not {"rejected", "prep speed", "throughput"} & set(reused)


def test_mlflow_links_go_to_the_configured_ui_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowspeed.tasks.tracking import ui_link

    monkeypatch.delenv("FLOWSPEED_MLFLOW_UI_URL", raising=False)
    assert ui_link("http://mlflow.internal:8080", "3", "r1") == "http://mlflow.internal:8080/#/experiments/3/runs/r1"
    assert ui_link("sqlite:////w/mlflow.db", "3", "r1") == "http://127.0.0.1:5000/#/experiments/3/runs/r1"
    monkeypatch.setenv("FLOWSPEED_MLFLOW_UI_URL", "https://mlflow.example.org/")  # behind a proxy
    for uri in ("http://10.0.0.5:8080", "sqlite:////w/mlflow.db"):
        assert ui_link(uri, "3", "r1") == "https://mlflow.example.org/#/experiments/3/runs/r1"


def test_config_descriptions_keep_their_placeholders_in_the_prefect_ui() -> None:
    """The run form renders field descriptions as markdown: a bare `<workdir>` is an HTML tag there and
    vanishes; inside backticks it shows as written."""
    import json

    descriptions = re.findall(r'"description": "((?:[^"\\]|\\.)*)"', json.dumps(PipelineConfig.model_json_schema()))
    bare = [d for d in descriptions if re.search(r"<[a-z_ ]+>", re.sub(r"`[^`]*`", "", d))]
    assert not bare, bare
    assert any("`<workdir>/prep/cache`" in d for d in descriptions)


def test_a_torchrun_rank_s_progress_lines_reach_the_launching_process_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 0 of a job launched inside `relay_progress` appends its lines to the file the environment names;
    the launcher logs them again in its own process (there: the Prefect task's flow run). Other ranks, and
    processes that are no rank, write nothing."""
    from flowspeed.engines.common.progress import RELAY_ENV, relay_progress

    line = "from flowspeed.engines.common.progress import log_train_step; log_train_step(2, 4, 0.5, 12.34, [1.0, 1.0])"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "PREFECT_LOGGING_EXTRA_LOGGERS")}
    caplog.set_level(logging.INFO, logger="flowspeed")
    with relay_progress(tmp_path / "progress.log", poll_s=0.05):
        for rank in ("0", "1", None):
            child = env | {RELAY_ENV: os.environ[RELAY_ENV]} | ({"RANK": rank} if rank else {})
            subprocess.run([sys.executable, "-c", line], env=child, check=True, timeout=60)
    assert RELAY_ENV not in os.environ
    relayed = [r.getMessage() for r in caplog.records if r.name == "flowspeed"]
    assert relayed == ["train step 2/4: loss 0.5000, 12.3 samples/s, ETA 0m02s"]
