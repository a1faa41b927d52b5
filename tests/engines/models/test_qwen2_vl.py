"""Qwen2-VL family on its tiny preset: labels, media tensors, training signal, export and inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flowspeed.engines.models.qwen2_vl  # noqa: F401  (registers the family)
import pytest
import torch
from flowspeed.configs import ComponentConfig, ModelConfig
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample

from tests.engines.models.chats import image_and_video_chats

FAM = get_family("qwen2_vl")
CFG = ModelConfig(family="qwen2_vl", max_text_length=256)
# image -> 28x56 px: grid (1, 2, 4); 3 frames padded to 4 -> grid (2, 2, 2)
IMAGE_CHAT, VIDEO_CHAT = image_and_video_chats((3, 30, 30))


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


def answer_spans(tokenizer, enc: dict[str, torch.Tensor]) -> list[str]:
    """Decoded runs of labelled tokens, one per assistant answer."""
    ids, labels = enc["input_ids"], enc["labels"]
    keep = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in keep:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tokenizer.decode(ids[r]) for r in runs]


def test_labels_cover_exactly_the_answers_of_an_image_chat(processor) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == enc["mm_token_type_ids"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    # LLaMA-Factory's qwen2_vl template trains the newline after <|im_end|> too (test_vlm_reference_encodings.py)
    assert answer_spans(processor.tokenizer, enc) == ["A red circle.<|im_end|>\n", "Top left.<|im_end|>\n"]
    assert enc["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert enc["pixel_values"].shape == (8, 3 * 2 * 14 * 14)  # t*h*w patches of (C, temporal 2, 14, 14)
    image_tokens = (enc["input_ids"] == FAM.load_model(CFG).config.image_token_id).sum()
    assert image_tokens == 8 // 4 == (enc["mm_token_type_ids"] == 1).sum()  # 2x2 patches merge into one token
    assert "pixel_values_videos" not in enc


def test_video_chat_and_unusable_samples(processor) -> None:
    enc = FAM.encode_sample(processor, VIDEO_CHAT, CFG.max_text_length)
    assert answer_spans(processor.tokenizer, enc) == ["Yes, to the right.<|im_end|>\n"]
    assert enc["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert enc["pixel_values_videos"].shape == (8, 1176)
    assert (enc["mm_token_type_ids"] == 2).sum() == 2
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)


def test_collate_pads_tokens_and_concatenates_media(processor) -> None:
    a, b = (FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT))
    batch = FAM.collate([a, b])
    longest = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = 0 if len(a["input_ids"]) < longest else 1
    assert (batch["labels"][short, -1] == IGNORE_INDEX) and (batch["attention_mask"][short, -1] == 0)
    assert batch["pixel_values"].shape == (8, 1176) and batch["pixel_values_videos"].shape == (8, 1176)
    assert batch["image_grid_thw"].shape == batch["video_grid_thw"].shape == (1, 3)


def test_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(processor, tmp_path: Path) -> None:
    """Labels, collate, loss, export and the respond prompt agree: a memorised batch is answered back."""
    model = FAM.load_model(CFG).train()
    batch = FAM.collate([FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = FAM.training_loss(model, None, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(263): a random init knows nothing
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2

    FAM.save_pretrained(tmp_path, CFG, model.eval())
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]  # batched, left-padded, each after its own media


def test_export_reloads_identically_and_responds(processor, tmp_path: Path) -> None:
    model = FAM.load_model(CFG).eval()
    FAM.save_pretrained(tmp_path, CFG, model)
    loaded_cfg = ModelConfig(family="qwen2_vl", transformer=ComponentConfig(pretrained=str(tmp_path)))
    reloaded = FAM.load_model(loaded_cfg).eval()
    batch = FAM.collate([FAM.encode_sample(FAM.load_processor(loaded_cfg), IMAGE_CHAT, 256)])
    assert torch.equal(batch["input_ids"], FAM.collate([FAM.encode_sample(processor, IMAGE_CHAT, 256)])["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    prompt_only = SequenceSample(messages=[{"role": "user", "content": "Say hi."}])
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT, prompt_only], max_new_tokens=4, device=torch.device("cpu"))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_missing_pretrained_directory_says_which_key_to_fix(tmp_path: Path) -> None:
    cfg = ModelConfig(family="qwen2_vl", transformer=ComponentConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="model.transformer.pretrained"):
        FAM.load_model(cfg)


def test_lora_targets_are_the_language_model_attention() -> None:
    names = [n for n, _ in FAM.load_model(CFG).named_modules() if n.endswith(FAM.lora_targets)]
    assert len(names) == 2 * 4 and all(n.startswith("model.language_model.layers.") for n in names)


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Prep, training and inference tokenize in different processes: ids must not follow hash seeds."""
    code = (
        "from flowspeed.engines.models.qwen2_vl import tiny_tokenizer as t; "
        "print(t()('<|im_start|>user\\na red circle<|im_end|><|image_pad|>').input_ids)"
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
    assert len(outs) == 1 and outs.pop().strip().startswith("[257, ")
