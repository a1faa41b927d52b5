"""`eval/reward`: the configured reward of each generated sample (or held-out answer), kept on its row, and their
mean; none for a family that only transcribes. The answering side runs in tests/flows/test_post_train.py, where
a reward gate reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.engines.common.device import resolve_device
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family
from flowspeed.evaluation.rewards import brightness
from flowspeed.evaluation.run import eval_reward, run_eval

from tests.conftest import on_prepped

REWARDS = 'eval.rewards=[{"name": "brightness", "weight": 2.0}, {"name": "tests.evaluation.test_eval_reward:words"}]'


def words(frames: object, prompts: list[str]) -> list[float]:
    """A media reward that reads the prompt: its word count (so each row's reward is told apart by its prompt)."""
    return [float(len(p.split())) for p in prompts]


@pytest.fixture(scope="module")
def rewarded(prepped: PipelineConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Any]:
    """A one-step export and its one-process eval with a reward: 2 prompts, one sample per batch (a sample's seed is
    then its own, whatever rank makes it)."""
    cfg = on_prepped(tmp_path_factory.mktemp("rewarded"), prepped, "train.max_steps=1", "train.checkpoint_every=1",
                     'eval.prompts=["a red circle", "a small blue square moving"]', "eval.num_inference_steps=1",
                     "eval.batch_size=1", REWARDS)  # fmt: skip
    launch(cfg, None, None)
    return cfg, run_eval(cfg)


def _rows(res: Any) -> list[dict]:
    path = Path(res.eval_dir) / "samples" / "generation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_each_generated_sample_gets_its_reward_and_the_eval_their_mean(rewarded: tuple[PipelineConfig, Any]) -> None:
    cfg, res = rewarded
    rows = _rows(res)
    # The same samples again (each its own batch and seed): the reward is 2 x their brightness + the prompt's words.
    e, d = cfg.eval, cfg.data
    family = get_family(cfg.model.family)
    expected = []
    for i, prompt in enumerate(e.prompts):
        video = family.generate(cfg.train_dir / "final", [prompt], num_frames=d.num_frames, height=d.height,
                                width=d.width, steps=e.num_inference_steps, guidance_scale=e.guidance_scale,
                                seed=e.seed + i, device=resolve_device("cpu"))  # fmt: skip
        expected.append(2 * brightness(video, [prompt])[0] + len(prompt.split()))
    # float32 sums: equal to float32 rounding of values below 10 (relative 2**-24, taken as 1e-6 with headroom)
    assert [r["reward"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert expected[1] - expected[0] > 1  # the prompt term reached each sample's own row
    assert res.metrics["eval/reward"] == pytest.approx(sum(expected) / 2, rel=1e-6)


@pytest.mark.slow
def test_two_ranks_score_their_own_samples_and_rank_0_averages(
    rewarded: tuple[PipelineConfig, Any], tmp_path: Path
) -> None:
    """torchrun with 2 gloo ranks, one sample each: each rank scores the sample it made; rank 0's mean is the
    one-process eval's (the rows equal to float32 rounding: CLIP and the reward sum in another thread count)."""
    cfg, one = rewarded
    ev = cfg.eval.model_copy(update={"nproc_per_node": 2, "output_dir": tmp_path / "two"})
    two = run_eval(cfg.model_copy(update={"eval": ev}))
    assert [r["reward"] for r in _rows(two)] == pytest.approx([r["reward"] for r in _rows(one)], rel=1e-6)
    assert two.metrics["eval/reward"] == pytest.approx(one.metrics["eval/reward"], rel=1e-6)


def test_the_reward_is_eval_rewards_else_the_training_one_and_none_for_transcripts(
    tmp_path: Path, prepped: PipelineConfig
) -> None:
    cpu = resolve_device("cpu")
    cogvideox = get_family("cogvideox")
    assert eval_reward(on_prepped(tmp_path, prepped), cogvideox, cpu) is None  # nothing configured: no metric
    own = eval_reward(on_prepped(tmp_path, prepped, REWARDS), cogvideox, cpu)
    assert own is not None and [(t.name, t.weight) for t in own.terms] == [
        ("brightness", 2.0), ("tests.evaluation.test_eval_reward:words", 1.0)]  # fmt: skip
    trained_on = on_prepped(tmp_path, prepped, 'train.method.rewards=[{"name": "brightness"}]')
    assert [t.name for t in eval_reward(trained_on, cogvideox, cpu).terms] == ["brightness"]
    assert eval_reward(on_prepped(tmp_path, prepped, REWARDS), get_family("whisper"), cpu) is None
