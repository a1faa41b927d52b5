"""What every post-training method shares: the method registry, its config checks at load, the rewards, and the
frozen reference model (the methods' own tests are beside this file)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flowspeed.configs import ConfigError, load_config
from flowspeed.configs.catalog import FLOW_GRPO_FAMILIES, REWARDS
from flowspeed.configs.schema import ClipConfig, RewardConfig
from flowspeed.engines.methods import get_method, reduce_metrics
from flowspeed.evaluation.rewards import build_reward, exact_answer, format_reward, normalize_answer

from tests.conftest import QUICKSTART, REPO

QWEN = REPO / "configs" / "pipelines" / "qwen2_vl-sft.yaml"


# ---- config checks at load -----------------------------------------------------------------------------------------
REFUSALS = {
    "dpo on a diffusion family": (QUICKSTART, ["train.method.name=dpo"], ["dpo", "vision-language", "cogvideox"]),
    "diffusion_dpo on a VLM": (QWEN, ["train.method.name=diffusion_dpo"], ["diffusion_dpo", "latent", "qwen2_vl"]),
    "flow_grpo on a video family": (
        QUICKSTART,
        ["train.method.name=flow_grpo", "train.method.rewards=[{name: brightness}]"],
        ["flow_grpo", "sd3, flux", "cogvideox"],
    ),
    "grpo without rewards": (QWEN, ["train.method.name=grpo"], ["train.method.rewards", "exact_answer"]),
    "dpo on packed rows": (QWEN, ["train.method.name=dpo"], ["train.packing.max_tokens: null"]),
    "precomputed reference outside dpo": (
        QWEN,
        ["train.method.name=grpo", "train.method.rewards=[{name: exact_answer}]", "train.method.reference=precomputed"],
        ["reference=precomputed", "dpo", "reference: model"],
    ),
    "a media reward for answers": (
        QWEN,
        ["train.method.name=grpo", "train.method.rewards=[{name: brightness}]"],
        ["train.method.rewards[0].name=brightness", "media", "exact_answer"],
    ),
    "an unknown reward": (QWEN, ["eval.rewards=[{name: helpfulness}]"], ["eval.rewards[0].name='helpfulness'"]),
    "format without a pattern": (QWEN, ["eval.rewards=[{name: format}]"], ["format reward needs `pattern`"]),
    "a method on megatron": (
        REPO / "configs" / "pipelines" / "qwen2_vl-sft-megatron.yaml",
        ["train.method.name=dpo"],
        ["train.engine: torch"],
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_a_method_the_family_cannot_train_is_refused_at_load(case: str) -> None:
    path, overrides, words = REFUSALS[case]
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_methods_that_fit_load() -> None:
    unpacked = "train.packing.max_tokens=null"
    load_config(QWEN, ["train.method.name=dpo", "train.method.reference=precomputed", unpacked])
    load_config(
        QWEN, ["train.method.name=grpo", "train.method.rewards=[{name: exact_answer}, {name: a.b:c}]", unpacked]
    )
    for family in FLOW_GRPO_FAMILIES:
        load_config(REPO / "configs" / f"{family}-quickstart.yaml",
                    ["train.method.name=flow_grpo", "train.method.rewards=[{name: brightness}]"])  # fmt: skip


def test_the_method_registry() -> None:
    assert get_method("sft").name == "sft"
    with pytest.raises(ValueError, match="unknown training method 'ppo'; known: .*dpo"):
        get_method("ppo")
    # micro-batch metrics average, key by key, and every key must be a tensor
    out = reduce_metrics([{"train/margin": torch.tensor(1.0)}, {"train/margin": torch.tensor(3.0)}])
    assert out == {"train/margin": torch.tensor(2.0)}
    assert reduce_metrics([]) == {}


# ---- rewards -------------------------------------------------------------------------------------------------------
def test_answer_rewards() -> None:
    assert normalize_answer("  The Cat. ") == "the cat"
    assert normalize_answer("thinking... <answer> 42 </answer>") == "42"
    assert exact_answer(["42.", "4 2", "<answer>Paris</answer>"], ["42", "42", "paris"], ["", "", ""]) == [1, 0, 1]
    fmt = format_reward(r"<think>.*</think>\s*<answer>.*</answer>")
    assert fmt(["<think>x</think> <answer>1</answer>", "<answer>1</answer>"], ["", ""], ["", ""]) == [1.0, 0.0]
    reward = build_reward([RewardConfig(name="exact_answer", weight=2.0), RewardConfig(name="format", pattern=r"\d+")])
    assert reward.text(["7", "seven"], ["7", "7"], ["q", "q"]).tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="scores text, not media"):
        reward.media(np.zeros((2, 1, 4, 4, 3), np.uint8), ["a", "b"])


def test_a_text_reward_reads_the_question_the_last_answer_answers() -> None:
    from flowspeed.evaluation.rewards import reward_prompt

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "Black."}]  # fmt: skip
    assert reward_prompt(chat) == reward_prompt(chat[:-1]) == "What colour?"  # held-out row, or a GRPO prompt
    assert reward_prompt(chat[:3]) == "What is it?" and reward_prompt([]) == ""


def constant_reward(frames: np.ndarray, prompts: list[str]) -> list[float]:
    """A user reward, loaded by name from this module."""
    return [0.5] * len(prompts)


def wrong_length_reward(frames: np.ndarray, prompts: list[str]) -> list[float]:
    return [0.5]


def test_media_rewards_and_callables() -> None:
    frames = np.stack([np.full((1, 8, 8, 3), v, np.uint8) for v in (0, 255)])  # a black and a white image
    assert build_reward([RewardConfig(name="brightness")]).media(frames, ["a", "b"]).tolist() == [0.0, 1.0]
    mod = __name__
    both = build_reward([RewardConfig(name="brightness"), RewardConfig(name=f"{mod}:constant_reward", weight=-2)])
    assert both.media(frames, ["a", "b"]).tolist() == [-1.0, 0.0]
    with pytest.raises(ValueError, match="gave \\(1,\\) values for 2 samples"):
        build_reward([RewardConfig(name=f"{mod}:wrong_length_reward")]).media(frames, ["a", "b"])
    with pytest.raises(ValueError, match="cannot load 'nope' from module"):
        build_reward([RewardConfig(name=f"{mod}:nope")])
    # CLIP score of each sample against its prompt, from the (random-init, offline) tiny CLIP: finite, deterministic
    clip = build_reward([RewardConfig(name="clip_score")], ClipConfig())
    a, b = clip.media(frames, ["a red circle", "a blue square"]), clip.media(frames, ["a red circle", "a blue square"])
    assert torch.equal(a, b) and all(math.isfinite(x) for x in a.tolist()) and a[0] != a[1]


def test_every_catalogued_reward_builds() -> None:
    for name in REWARDS:
        build_reward([RewardConfig(name=name, pattern=".*")], ClipConfig())


# ---- the frozen reference ------------------------------------------------------------------------------------------
def test_a_frozen_reference_is_the_starting_model_without_gradients(tmp_path) -> None:
    from flowspeed.engines.models import get_family
    from flowspeed.engines.torch_engine.setup import build_model, init_distributed

    cfg = load_config(QWEN, ["train.lora.enabled=true"], workdir=tmp_path)
    family = get_family("qwen2_vl")
    env = init_distributed(cfg)
    policy = build_model(family, cfg, {}, env)
    ref = build_model(family, cfg, {}, env, frozen=True)
    assert any(p.requires_grad for p in policy.parameters()) and not any(p.requires_grad for p in ref.parameters())
    assert not any("lora" in n for n, _ in ref.named_parameters())  # no adapters on the reference
    from flowspeed.engines.methods.reference import adapters_off

    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = ref(input_ids=ids).logits
        torch.nn.init.normal_(next(p for n, p in policy.named_parameters() if "lora_B" in n))  # the adapter now acts
        adapted = policy(input_ids=ids).logits
        with adapters_off(policy) as off:
            plain = off(input_ids=ids).logits
    assert not torch.allclose(adapted, base) and torch.equal(plain, base)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # switched back on
