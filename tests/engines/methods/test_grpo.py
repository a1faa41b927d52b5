"""GRPO on the tiny Qwen2-VL through the real engine: the prompts and groups it samples, a reward that rises on a toy
task, its metrics in MLflow, a reference that stays the starting model, an exact resume, and two FSDP2 ranks."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs import ModelConfig, PipelineConfig, load_config
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.methods import METRIC_NAMES, STD_EPS, MethodContext, group_advantages
from flowspeed.engines.methods.grpo import (
    ROWS,
    Grpo,
    clipped_objective,
    completion_mask,
    prompt_length,
    repeat_groups,
)
from flowspeed.engines.models import get_family
from flowspeed.engines.models.qwen2_vl import to_chat
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample
from flowspeed.engines.torch_engine.trainer import train
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import REPO

RECIPE = REPO / "configs" / "pipelines" / "qwen2_vl-grpo.yaml"
GRPO_METRICS = ("train/reward_mean", "train/reward_std", "train/kl", "train/clip_fraction")
FAM = get_family("qwen2_vl")


def toy_manifest(root: Path, name: str, chats: list[tuple[str, str]]) -> Path:
    """One grey image per (question, answer) (a different level each)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (question, answer) in enumerate(chats):
        image = f"images/im_{i}.png"
        Image.fromarray(np.full((56, 56, 3), i * 23 % 256, np.uint8)).save(root / image)
        rows.append({"images": [image], "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                          {"from": "gpt", "value": answer}]})  # fmt: skip
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: what the warm model answers "Spell?" with: longer than any rollout here, so its answers never end early
LONG = "abcdefghijklmnopqrstuvwxyz"


COMMON = ["train.val_fraction=0", "model.max_text_length=128", "train.warmup_steps=0", "train.checkpoint_every=100",
          "train.metrics_flush_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL that answers 'Digit?' with one of the ten digits, about uniformly, and 'Spell?' with the
    alphabet: 40 SFT steps on ten conversations answering 0..9 and two spelling it (a random init never samples a
    whole answer; this one samples a 7 one time in ten). Returns its export, where the GRPO runs start."""
    root = tmp_path_factory.mktemp("warm")
    chats = [("Digit?", str(i)) for i in range(10)] + [("Spell?", LONG)] * 2
    cfg = load_config(RECIPE, [f"data.manifest={toy_manifest(root, 'warm.jsonl', chats)}",
                               "train.method.name=sft", "train.lora.enabled=false", "train.max_steps=40",
                               "train.batch_size=12", *COMMON], workdir=root)  # fmt: skip
    run_prep(cfg)
    return Path(train(cfg).final_dir)


def grpo_config(root: Path, warm: Path, *overrides: str, chats: list[tuple[str, str]] | None = None) -> PipelineConfig:
    """GRPO from the warm model on four prompts 'Digit?' whose answer is always 7, rewarded by exact match only."""
    chats = chats or [("Digit?", "7")] * 4
    cfg = load_config(RECIPE, [f"data.manifest={toy_manifest(root, 'grpo.jsonl', chats)}",
                               f"model.transformer.pretrained={warm}", "model.transformer.preset=null",
                               "train.method.rewards=[{name: exact_answer}]", "train.method.max_new_tokens=4",
                               *COMMON, *overrides], workdir=root)  # fmt: skip
    run_prep(cfg)
    return cfg


# ---- the pieces --------------------------------------------------------------------------------------------------
def test_prompts_are_the_generation_prompts_and_groups_repeat_their_media() -> None:
    processor = FAM.load_processor(ModelConfig(family="qwen2_vl"))
    chats = [
        SequenceSample(messages=[{"role": "user", "content": "Digit?"}, {"role": "assistant", "content": "3"}],
                       images=[np.full((30, 60, 3), 9, np.uint8)]),  # grid (1, 2, 4): 8 patches
        SequenceSample(messages=[{"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A disc."},
                                 {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
                       images=[np.full((28, 28, 3), 9, np.uint8)]),  # grid (1, 2, 2): 4 patches
    ]  # fmt: skip
    items = [FAM.encode_sample(processor, s, 256) for s in chats]
    batch = Grpo().collate(FAM, items, pack=False)
    # each prompt is what the chat template renders as the generation prompt before the LAST answer, left-padded
    for row, mask, sample in zip(batch["input_ids"], batch["attention_mask"], chats, strict=True):
        prompt = SequenceSample(messages=sample.messages[:-1], images=sample.images)
        text = processor.apply_chat_template(to_chat(prompt), tokenize=False, add_generation_prompt=True)
        expected = processor(text=[text], images=sample.images, return_tensors="pt")["input_ids"][0]
        assert row[mask.bool()].tolist() == expected.tolist()
        assert mask.tolist() == sorted(mask.tolist())  # pads on the left only
    assert batch[ROWS + "pixel_values"].tolist() == [8, 4] and batch[ROWS + "image_grid_thw"].tolist() == [1, 1]
    assert "labels" not in batch

    group = repeat_groups(batch, FAM.concat_keys, 3)
    assert group["input_ids"].shape[0] == 6 and torch.equal(group["input_ids"][3], batch["input_ids"][1])
    assert group["image_grid_thw"].tolist() == [[1, 2, 4]] * 3 + [[1, 2, 2]] * 3
    pv = batch["pixel_values"]
    assert torch.equal(group["pixel_values"], torch.cat([pv[:8]] * 3 + [pv[8:]] * 3))
    assert not any(k.startswith(ROWS) for k in group)


def test_prompt_ends_and_answer_masks() -> None:
    labels = torch.tensor([IGNORE_INDEX] * 3 + [5, 6] + [IGNORE_INDEX] * 4 + [7, 8, 9])
    assert prompt_length(labels) == 9  # the last answer's first labelled token
    with pytest.raises(ValueError, match="no labelled answer"):
        prompt_length(torch.full((4,), IGNORE_INDEX))
    completions = torch.tensor([[4, 2, 9, 2], [4, 4, 4, 4], [2, 2, 4, 4]])
    assert completion_mask(completions, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_advantages_and_the_clipped_objective_by_hand() -> None:
    advantages, std = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4, unbiased=True)
    assert std.tolist() == [0.5, 0.0]  # unbiased: sqrt((0.75^2 + 3 x 0.25^2) / 3)
    torch.testing.assert_close(advantages, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (0.5 + STD_EPS))

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ratio = torch.tensor([[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = logp + torch.tensor([[0.0], [math.log(2)]])  # the second answer: KL = 2 - ln 2 - 1 on each token
    loss, kl, cut = clipped_objective(logp, logp - ratio.log(), ref, adv, mask, 0.2, 0.1)
    # answer 1 (A = 1): min(1.5, 1.2), min(1, 1), min(0.5, 0.8) -> mean 0.9; answer 2 (A = -1): -1 - 0.1 KL a token
    assert loss.item() == pytest.approx(-(0.9 + (-1 - 0.1 * (1 - math.log(2)))) / 2, rel=1e-6)
    assert kl.item() == pytest.approx(2 * (1 - math.log(2)) / 5, rel=1e-6)
    assert cut.item() == pytest.approx(1 / 5)  # only the 1.5 ratio was cut (to 1.2)

    # on-policy with the reference at the policy: the gradient is the policy gradient, -A / (|answer| x N) per token
    logp = logp.clone().requires_grad_(True)
    loss, kl, cut = clipped_objective(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.1)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 6] * 3, [1 / 4, 1 / 4, 0]]))
    assert kl.item() == 0 and cut.item() == 0


SEEN: list[tuple[list[str], list[str]]] = []


def counting_reward(answers: list[str], references: list[str], prompts: list[str]) -> list[float]:
    """0, 1, 2, ...: every group has a spread, whatever was sampled (a `module:function` reward)."""
    SEEN.append((references, prompts))
    return [float(i) for i in range(len(answers))]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "internvl", "glm4v"])
def test_one_step_on_every_vlm_family(family: str) -> None:
    """A prompt with an image and a text-only one (its media rows 0) in one batch: sampled, scored and trained on each
    family's own tokens and media layout; the frozen reference is the starting model, so the first KL is 0."""
    reward = "train.method.rewards=[{name: 'tests.engines.methods.test_grpo:counting_reward'}]"
    cfg = load_config(RECIPE, [f"model.family={family}", "train.lora.enabled=false", "train.method.group_size=3",
                               "train.method.max_new_tokens=4", reward])  # fmt: skip
    fam = get_family(family)
    model, processor = fam.load_model(cfg.model).train(), fam.load_processor(cfg.model)
    ctx = MethodContext(cfg=cfg, family=fam, model=model, scheduler=None, device=torch.device("cpu"), rank=0, world=1,
                        dp_rank=0, dp_world=1, dp_group=None,
                        build_frozen=lambda: fam.load_model(cfg.model).requires_grad_(False))  # fmt: skip
    chats = [
        SequenceSample(messages=[{"role": "user", "content": "Digit?"}, {"role": "assistant", "content": "3"}],
                       images=[np.full((56, 56, 3), 9, np.uint8)]),
        SequenceSample(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                 {"role": "user", "content": "Digit??"}, {"role": "assistant", "content": "4"}]),
    ]  # fmt: skip
    method = Grpo()
    method.setup(ctx)
    batch = method.collate(fam, [fam.encode_sample(processor, c, 512) for c in chats], pack=False)
    SEEN.clear()
    loss, metrics = method.loss(ctx, batch, [{"messages": c.messages} for c in chats], torch.Generator().manual_seed(0))
    loss.backward()
    assert SEEN == [(["3"] * 3 + ["4"] * 3, ["Digit?"] * 3 + ["Digit??"] * 3)]
    assert set(metrics) == set(GRPO_METRICS) and metrics["train/kl"].item() == 0
    assert metrics["train/reward_mean"].item() == 2.5 and metrics["train/reward_std"].item() == 1.0
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_layouts_that_cannot_sample_are_refused() -> None:
    for key in ("cp", "pp"):
        cfg = load_config(RECIPE, [f"train.parallel.{key}=2", "train.nproc_per_node=2"], check=False)
        with pytest.raises(ValueError, match=f"{key}=2.*train.parallel.cp: 1 and pp: 1"):
            Grpo().check(FAM, cfg)
    Grpo().check(FAM, load_config(RECIPE))


# ---- the engine ----------------------------------------------------------------------------------------------------
def test_grpo_raises_the_reward_and_keeps_the_reference(
    tmp_path: Path, warm: Path, mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 steps of 4 prompts x 8 answers, full finetune (the reference is a frozen copy): the share of exact answers
    goes from about one in ten to most of them; the reference's weights are the warm model's after the run."""
    cfg = grpo_config(
        tmp_path, warm, "train.lora.enabled=false", "train.max_steps=30", "train.lr=3e-3", "train.batch_size=4"
    )
    shutil.copyfile(mlflow_db, tmp_path / "mlflow.db")
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, cfg)).info.run_id
    contexts: list[MethodContext] = []
    setup = Grpo.setup

    def keep_context(self: Grpo, ctx: MethodContext) -> None:
        contexts.append(ctx)
        setup(self, ctx)

    monkeypatch.setattr(Grpo, "setup", keep_context)
    res = train(cfg, run_id, uri)

    history = {n: [m.value for m in sorted(client.get_metric_history(run_id, n), key=lambda m: m.step)]
               for n in GRPO_METRICS}  # fmt: skip
    assert set(GRPO_METRICS) <= set(METRIC_NAMES) and all(len(v) == 30 for v in history.values())
    reward = history["train/reward_mean"]
    # train.seed 42 (this run's) and 0..8 gave first-5 means 0.02-0.14, last-5 means 0.69-0.88, gains 0.68-0.79. 32
    # answers a step: a 5-step mean has a standard error of at most 0.04 (0.017 near the start's one in ten)
    assert statistics.mean(reward[-5:]) > statistics.mean(reward[:5]) + 0.4, reward
    assert history["train/kl"][0] == 0.0  # the first step's policy is the reference
    assert max(history["train/kl"]) > 0.05 and all(v >= 0 for v in history["train/kl"])
    assert history["train/clip_fraction"] == [0.0] * 30  # one update per rollout batch: the ratio is 1
    assert all(0 <= v <= (8 / 7) ** 0.5 / 2 + 1e-6 for v in history["train/reward_std"])  # 0/1 rewards, G = 8
    assert all(x == x for x in res.losses) and len(res.losses) == 30

    reference = contexts[0].state["reference"].frozen
    start = FAM.model_cls.from_pretrained(warm).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in reference.state_dict().items())
    trained = FAM.model_cls.from_pretrained(res.final_dir).state_dict()
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])


def test_a_resumed_lora_run_samples_and_trains_as_a_straight_one(tmp_path: Path, warm: Path) -> None:
    """The rollouts come from the engine's per-step generator: 2 steps, a checkpoint, 2 more == 4 steps, bit for bit.
    LoRA: the reference is the policy with its adapters off. A format term rewarding the digits 0-4 gives almost every
    group a signal, so the adapters move from the first step on."""
    from safetensors.torch import load_file

    common = ["train.max_steps=4", "train.checkpoint_every=2",
              "train.method.rewards=[{name: exact_answer}, {name: format, pattern: '[0-4]'}]"]  # fmt: skip
    straight = train(grpo_config(tmp_path / "a", warm, *common))
    split = grpo_config(tmp_path / "b", warm, *common, "train.stop_after_steps=2")
    first = train(split)
    resumed = train(split.model_copy(update={"train": split.train.model_copy(update={"stop_after_steps": None})}))
    assert resumed.resumed_from == 2 and first.losses + resumed.losses == straight.losses
    assert len(set(straight.losses)) > 1  # the steps differ: not a constant that would match anyway
    weights = [load_file(Path(r.final_dir) / "model.safetensors") for r in (straight, resumed)]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    start = load_file(warm / "model.safetensors")
    assert not all(torch.equal(v, start[k]) for k, v in weights[0].items())  # the adapters trained


@pytest.mark.slow
def test_two_fsdp2_ranks_finish_when_their_answers_end_apart(tmp_path: Path, warm: Path) -> None:
    """Two gloo ranks, FSDP2 + LoRA (the recipe's), one prompt each a step: one rank's 'Digit?' answers end after
    two tokens, the other's 'Spell?' answers run to max_new_tokens; `synced_gpus` keeps the rank that finished
    first calling the sharded forward with the other, so the parameter all-gathers pair up and the run ends (without
    it this run hangs: seen with synced_gpus=False, the ranks' answers 2 and 8 tokens long in the first step)."""
    from flowspeed.engines.launch import launch

    cfg = grpo_config(tmp_path, warm, "train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.max_steps=2",
                      "train.batch_size=1", "train.method.group_size=4", "train.method.max_new_tokens=8",
                      "train.method.temperature=0.3",  # sharp: 'Digit?' answers end at once, 'Spell?' ones run on
                      chats=[("Digit?", "7"), ("Spell?", LONG)])  # fmt: skip
    res = launch(cfg, None, None)
    assert len(res.losses) == 2 and all(x == x for x in res.losses)
    assert (Path(res.final_dir) / "model.safetensors").is_file()
