"""The post-train flow promotes a version only when its reward gate passes: an SFT pipeline run makes the champion,
then post-training runs from it are gated on `eval/reward`, which the SFT champion never measured, so the first
gate measures the champion with the post-training run's own eval and records it on the champion's version."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from mlflow import MlflowClient

from tests.conftest import REPO

QWEN = REPO / "configs" / "pipelines" / "qwen2_vl-sft.yaml"
# eval.split=all: two answers to score (the demo's held-out split is one record)
TINY = ["train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=0", "eval.split=all", "eval.max_answers=2",
        "eval.max_new_tokens=4", "tracking.registry.enabled=true", "tracking.registry.model_name=vlm"]  # fmt: skip
# The post-training method: DPO on the demo's preference pairs, from the SFT champion
METHOD = "train.method.name=dpo"
REWARD = 'eval.rewards=[{"name": "tests.flows.test_post_train:answer_chars"}]'


def answer_chars(answers: list[str], references: list[str], prompts: list[str]) -> list[float]:
    """A reward this test controls and can recompute from the eval's rows: the answer's length in characters / 10."""
    return [len(a) / 10 for a in answers]


def _gate(min_improvement: float) -> str:
    return f'tracking.registry.gates=[{{"metric": "eval/reward", "min_improvement": {min_improvement}}}]'


@pytest.fixture
def post_train_cfg() -> Callable[..., PipelineConfig]:
    """Qwen2-VL's tiny SFT recipe with a registry, as a factory of (workdir, manifest, *overrides)."""
    from flowspeed.configs import load_config

    def make(workdir: Path, manifest: Path, *overrides: str) -> PipelineConfig:
        return load_config(QWEN, [f"data.manifest={manifest}", *TINY, *overrides], workdir=workdir)

    return make


def test_the_post_train_flow_promotes_only_when_the_reward_gate_passes(
    tmp_path: Path,
    demo_manifest: Path,
    mlflow_db: Path,
    post_train_cfg: Callable[..., PipelineConfig],
) -> None:
    from flowspeed.flows.pipeline import pipeline
    from flowspeed.flows.post_train import post_train

    work = tmp_path / "w"
    work.mkdir()
    shutil.copyfile(mlflow_db, work / "mlflow.db")  # the workdir's default store, its schema already made
    conversations = demo_manifest.with_name("conversations.jsonl")
    preferences = demo_manifest.with_name("preferences.jsonl")  # the DPO demo data: SFT trains on its chosen side
    # (1) SFT makes the champion; it measured no reward.
    sft = pipeline(post_train_cfg(work, conversations))
    assert sft["registry"]["alias"] == "champion" and "eval/reward" not in sft["eval"]["metrics"]
    client = MlflowClient(sft["tracking_uri"])
    assert "metric.eval/reward" not in client.get_model_version("vlm", "1").tags

    # DPO pads each pair's two sides into one forward: no packing (SFT trains the same either way)
    post = [METHOD, "train.packing.max_tokens=null", "train.batch_size=2", "train.init_from=champion", REWARD]
    # (2) A gate no run can pass: the champion's reward is measured first (with this run's eval), then compared.
    failed = post_train(post_train_cfg(work, preferences, *post, _gate(1e9)))
    reg = failed["registry"]
    assert (reg["version"], reg["alias"], reg["champion_before"]) == ("2", "challenger", "1")
    champion_tags = client.get_model_version("vlm", "1").tags
    measured = float(champion_tags["metric.eval/reward"])
    # the measured value is the reward of the champion's own answers, scored by the same reward
    responses = Path(champion_tags["flowspeed.measured.eval/reward"]) / "samples" / "responses.jsonl"
    rows = [json.loads(line) for line in responses.read_text().splitlines() if line.strip()]
    # the Reward sums in float64 and hands back float32: equal to float32 rounding (relative 2**-24)
    expected = answer_chars([r["response"] for r in rows], [], [])
    assert len(rows) == 2 and [r["reward"] for r in rows] == pytest.approx(expected, rel=1e-7)
    assert measured == pytest.approx(sum(r["reward"] for r in rows) / 2)
    assert reg["reasons"][0].startswith("eval/reward: the champion (version 1) had no value; measured")
    assert "eval/reward" in reg["reasons"][1] and "fails" in reg["reasons"][1]
    candidate = failed["eval"]["metrics"]["eval/reward"]
    assert float(client.get_model_version("vlm", "2").tags["metric.eval/reward"]) == pytest.approx(candidate)
    assert str(client.get_model_version_by_alias("vlm", "champion").version) == "1"
    assert "eval/reward" in client.get_run(failed["mlflow_run_id"]).data.tags["flowspeed.registry.reasons"]

    # (3) A gate the run reaches (any change in reward passes): promoted; the champion's recorded reward is read,
    # not measured again.
    passed = post_train(post_train_cfg(work, preferences, *post, _gate(-1e9)))
    reg = passed["registry"]
    assert (reg["version"], reg["alias"], reg["champion_before"]) == ("3", "champion", "1")
    assert len(reg["reasons"]) == 1 and f"vs champion {measured:.6g}" in reg["reasons"][0]
    assert str(client.get_model_version_by_alias("vlm", "champion").version) == "3"
    init_from = client.get_run(passed["mlflow_run_id"]).data.tags["flowspeed.init_from"]
    assert init_from == "models:/vlm@champion (version 1)"


def test_a_config_that_is_not_a_post_training_one_is_refused_before_any_work(tmp_path: Path,
                                                                             demo_manifest: Path) -> None:  # fmt: skip
    from flowspeed.configs import load_config
    from flowspeed.flows.post_train import post_train, post_train_problems

    sft = load_config(QWEN, [f"data.manifest={demo_manifest.with_name('conversations.jsonl')}"], workdir=tmp_path)
    problems = post_train_problems(sft)
    assert [p.split("=")[0].split(" ")[0] for p in problems] == [
        "train.method.name", "train.init_from", "tracking.registry.enabled"]  # fmt: skip
    no_gates = sft.model_copy(update={"tracking": sft.tracking.model_copy(update={
        "registry": sft.tracking.registry.model_copy(update={"enabled": True, "gates": []})})})  # fmt: skip
    assert any(p.startswith("tracking.registry.gates is empty") for p in post_train_problems(no_gates))
    reward_gate = load_config(QWEN, [f"data.manifest={demo_manifest.with_name('conversations.jsonl')}",
                                     "tracking.registry.enabled=true", _gate(0.02)], workdir=tmp_path)  # fmt: skip
    assert any("no reward is configured" in p for p in post_train_problems(reward_gate))
    with pytest.raises(ValueError, match="not a post-training config") as err:
        post_train(sft)
    assert "train.init_from: champion" in str(err.value) and not (tmp_path / "prep").exists()
