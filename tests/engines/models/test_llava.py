"""LLaVA-1.5 family on its tiny preset: labels, image tensors, training signal, export and inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flowspeed.engines.models.llava  # noqa: F401  (registers the family)
import numpy as np
import pytest
import torch
from flowspeed.configs import ComponentConfig, ModelConfig
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample

FAM = get_family("llava")
CFG = ModelConfig(family="llava", max_text_length=512)  # vicuna_v1 system prompt: ~150 byte tokens
RNG = np.random.default_rng(0)
IMAGE_CHAT = SequenceSample(
    messages=[
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Top left."},
    ],
    images=[RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)],  # resized and cropped to 56x56: 16 tokens
)
TEXT_CHAT = SequenceSample(
    messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Is the sky blue?"},
        {"role": "assistant", "content": "Yes, by day."},
    ]
)


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


def answer_spans(tokenizer, enc: dict[str, torch.Tensor]) -> list[str]:
    """Decoded runs of labelled tokens, one per assistant answer."""
    ids, labels = enc["input_ids"], enc["labels"]
    runs: list[list[int]] = []
    for i in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tokenizer.decode(ids[r]) for r in runs]


def test_labels_cover_exactly_the_answers_and_their_eos(processor) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    # LLaVA-1.5's format puts the space before an answer inside it ("ASSISTANT:" then " A red...")
    assert answer_spans(processor.tokenizer, enc) == [" A red circle.</s>", " Top left.</s>"]
    assert enc["input_ids"][0] == processor.tokenizer.bos_token_id
    assert enc["pixel_values"].shape == (1, 3, 56, 56)
    assert (enc["input_ids"] == FAM.load_model(CFG).config.image_token_id).sum() == (56 // 14) ** 2  # CLS dropped

    text = FAM.encode_sample(processor, TEXT_CHAT, CFG.max_text_length)
    assert answer_spans(processor.tokenizer, text) == [" Yes, by day.</s>"] and "pixel_values" not in text


def test_unusable_samples_are_refused(processor) -> None:
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)
    video = SequenceSample(messages=TEXT_CHAT.messages, videos=[np.zeros((2, 28, 28, 3), np.uint8)])
    with pytest.raises(ValueError, match="qwen2_vl"):
        FAM.encode_sample(processor, video, 256)


def test_collate_pads_tokens_and_stacks_images(processor) -> None:
    a, b = (FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, TEXT_CHAT))
    batch = FAM.collate([a, b])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(a["input_ids"]))
    assert batch["labels"][1, -1] == IGNORE_INDEX and batch["attention_mask"][1, -1] == 0
    assert batch["pixel_values"].shape == (1, 3, 56, 56)


def test_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(processor, tmp_path: Path) -> None:
    """Labels, collate, loss, export and the respond prompt agree: a memorised batch is answered back."""
    model = FAM.load_model(CFG).train()
    batch = FAM.collate([FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, TEXT_CHAT)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = FAM.training_loss(model, None, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(261): a random init knows nothing
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2

    FAM.save_pretrained(tmp_path, CFG, model.eval())
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, TEXT_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, by day."]  # batched and left-padded; stops at </s>


def test_export_reloads_identically_and_responds(processor, tmp_path: Path) -> None:
    model = FAM.load_model(CFG).eval()
    FAM.save_pretrained(tmp_path, CFG, model)
    loaded_cfg = ModelConfig(family="llava", transformer=ComponentConfig(pretrained=str(tmp_path)))
    reloaded = FAM.load_model(loaded_cfg).eval()
    batch = FAM.collate([FAM.encode_sample(FAM.load_processor(loaded_cfg), IMAGE_CHAT, CFG.max_text_length)])
    ours = FAM.collate([FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)])
    assert torch.equal(batch["input_ids"], ours["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    prompt_only = SequenceSample(messages=[{"role": "user", "content": "Say hi."}])
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, prompt_only], max_new_tokens=4, device=torch.device("cpu"))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_missing_pretrained_directory_says_which_key_to_fix(tmp_path: Path) -> None:
    cfg = ModelConfig(family="llava", transformer=ComponentConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="model.transformer.pretrained"):
        FAM.load_model(cfg)


def test_lora_targets_cover_the_language_model_attention() -> None:
    names = [n for n, _ in FAM.load_model(CFG).named_modules() if n.endswith(FAM.lora_targets)]
    assert len([n for n in names if n.startswith("model.language_model.layers.")]) == 2 * 4
    # CLIP names q/k/v_proj the same way: these suffixes alone also reach the vision tower
    assert {n.split(".")[1] for n in names} == {"language_model", "vision_tower"}


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Prep, training and inference tokenize in different processes: ids must not follow hash seeds."""
    code = (
        "from flowspeed.engines.models.llava import tiny_tokenizer as t; "
        "print(t()('USER: <image>\\na red circle</s>').input_ids)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        for seed in (1, 2)
    ]
    outs = {p.communicate(timeout=120)[0] for p in procs}
    assert len(outs) == 1 and outs.pop().strip().startswith("[1, ")
