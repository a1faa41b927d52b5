"""prefect.yaml is valid: every deployment's parameters validate as a config, the nightly one is paused.

Deploying it to a real (PostgreSQL-backed) Prefect server and running it on a process worker is in
tests/flows/test_team_mode.py."""

import yaml
from flowspeed.configs import PipelineConfig

from tests.conftest import REPO


def test_every_deployment_has_a_valid_config_and_the_nightly_one_is_paused() -> None:
    import importlib

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"flowspeed-pipeline", "flowspeed-prep", "flowspeed-train", "flowspeed-evaluate",
                         "flowspeed-nightly-finetune"}  # fmt: skip
    for dep in deps.values():
        module, func = dep["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        assert hasattr(importlib.import_module(module.replace(".py", "")), func), dep["entrypoint"]
        cfg = PipelineConfig.model_validate(dep["parameters"]["cfg"])  # the run form's defaults validate
        assert cfg.model.family == "cogvideox" and dep["work_pool"]["name"] == "local"
        assert dep["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_DEFAULT_RETRIES"] == "1"
    nightly = deps["flowspeed-nightly-finetune"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is False
    cfg = PipelineConfig.model_validate(nightly["parameters"]["cfg"])
    assert cfg.train.init_from == "champion" and cfg.tracking.registry.enabled and cfg.data.incoming
