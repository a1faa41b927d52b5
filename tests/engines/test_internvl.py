"""InternVL family on its tiny preset: labels, tiles, training signal, export, inference and LoRA."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engines.models.internvl  # noqa: F401  (registers the family)
from configs import ComponentConfig, LoraConfig, ModelConfig
from engines.models.registry import get_family
from engines.models.sequence import IGNORE_INDEX, SequenceSample
from engines.torch_engine.lora import apply_lora, load_adapter, merge, save_adapter

FAM = get_family("internvl")
CFG = ModelConfig(family="internvl", max_text_length=256)
RNG = np.random.default_rng(0)
IMAGE_CHAT = SequenceSample(
    messages=[
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Top left."},
    ],
    images=[RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)],  # near-square: one 56-px tile, 4 tokens
)
VIDEO_CHAT = SequenceSample(
    messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Does it move?"},
        {"role": "assistant", "content": "Yes, to the right."},
    ],
    videos=[RNG.integers(0, 256, (3, 30, 30, 3), dtype=np.uint8)],  # 3 frames: one tile each
)


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


@pytest.fixture(scope="module")
def image_token_id() -> int:
    return FAM.load_model(CFG).config.image_token_id


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


def test_labels_cover_exactly_the_answers_of_an_image_chat(processor, image_token_id: int) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    assert answer_spans(processor.tokenizer, enc) == ["A red circle.<|im_end|>", "Top left.<|im_end|>"]
    assert enc["pixel_values"].shape == (1, 3, 56, 56)
    assert (enc["input_ids"] == image_token_id).sum() == 4  # (56/14)^2 patches, pixel-shuffled 0.5
    text = processor.tokenizer.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is")  # no system turn

    wide = SequenceSample(messages=IMAGE_CHAT.messages, images=[RNG.integers(0, 256, (40, 130, 3), dtype=np.uint8)])
    enc = FAM.encode_sample(processor, wide, CFG.max_text_length)
    assert enc["pixel_values"].shape == (4, 3, 56, 56)  # 3 tiles across + the thumbnail
    assert (enc["input_ids"] == image_token_id).sum() == 4 * 4


def test_video_chat_and_unusable_samples(processor, image_token_id: int) -> None:
    enc = FAM.encode_sample(processor, VIDEO_CHAT, CFG.max_text_length)
    assert answer_spans(processor.tokenizer, enc) == ["Yes, to the right.<|im_end|>"]
    assert enc["pixel_values"].shape == (3, 3, 56, 56)  # frames become tiles
    assert (enc["input_ids"] == image_token_id).sum() == 3 * 4
    assert "Frame3: <img>" in processor.tokenizer.decode(enc["input_ids"])
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)
    two = SequenceSample(messages=VIDEO_CHAT.messages, videos=[VIDEO_CHAT.videos[0], VIDEO_CHAT.videos[0][:2]])
    with pytest.raises(ValueError, match="same frame count"):
        FAM.encode_sample(processor, two, 256)


def test_collate_pads_tokens_and_concatenates_tiles(processor) -> None:
    a, b = (FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT))
    batch = FAM.collate([a, b])
    longest = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = 0 if len(a["input_ids"]) < longest else 1
    assert (batch["labels"][short, -1] == IGNORE_INDEX) and (batch["attention_mask"][short, -1] == 0)
    assert batch["pixel_values"].shape == (1 + 3, 3, 56, 56)


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
    loaded_cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path)))
    reloaded = FAM.load_model(loaded_cfg).eval()
    batch = FAM.collate([FAM.encode_sample(FAM.load_processor(loaded_cfg), s, 256) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    ours = FAM.collate([FAM.encode_sample(processor, s, 256) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    assert all(torch.equal(batch[k], ours[k]) for k in ("input_ids", "pixel_values"))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    prompt_only = SequenceSample(messages=[{"role": "user", "content": "Say hi."}])
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT, prompt_only], max_new_tokens=4, device=torch.device("cpu"))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_missing_pretrained_directory_says_which_key_to_fix(tmp_path: Path) -> None:
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="model.transformer.pretrained"):
        FAM.load_model(cfg)


def test_original_remote_code_checkpoints_are_refused_with_the_conversion(tmp_path: Path) -> None:
    """An OpenGVLab InternVL2-style directory: its config points at its own modelling code."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
    }))  # fmt: skip
    (tmp_path / "modeling_internvl_chat.py").write_text("raise SystemExit('remote code ran')\n")
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path)))
    for load in (FAM.load_model, FAM.load_processor):
        with pytest.raises(ValueError, match="convert_internvl_weights_to_hf.py") as err:
            load(cfg)
        assert "InternVL3-1B-hf" in str(err.value) and "model.transformer.pretrained" in str(err.value)
    hub = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained="OpenGVLab/InternVL2-1B"))
    with pytest.raises(ValueError, match="no -hf suffix"):  # refused by name, before any download
        FAM.load_model(hub)


def test_lora_adapts_only_the_language_model_reloads_and_merges(processor, tmp_path: Path) -> None:
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(FAM.load_model(CFG), lora, FAM.lora_targets, FAM.lora_exclude).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # layers x (q, k, v, o) x (A, B)
    assert all("lora_" in n and n.startswith("model.language_model.layers.") for n in trainable)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    batch = FAM.collate([FAM.encode_sample(processor, IMAGE_CHAT, 256)])
    batch.pop("labels")
    with torch.no_grad():
        adapted = model(**batch).logits
        assert not torch.allclose(adapted, FAM.load_model(CFG).eval()(**batch).logits)
    save_adapter(model, tmp_path / "lora", lora, FAM.lora_targets)
    again = apply_lora(FAM.load_model(CFG), lora, FAM.lora_targets, FAM.lora_exclude).eval()
    load_adapter(again, tmp_path / "lora")
    merged = merge(model)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, adapted)
        assert torch.allclose(merged(**batch).logits, adapted, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_internvl3_1b_variant_is_within_one_percent_of_published() -> None:
    from engines.models.variants import family_summary, get_variant, parameter_counts

    counts = parameter_counts("internvl", "internvl3-1b")
    assert counts["components"]["model"] == pytest.approx(get_variant("internvl", "internvl3-1b").published, rel=0.01)
    assert family_summary("internvl")["tasks"] == ["sft(image+video)", "pretrain", "finetune", "lora"]


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Prep, training and inference tokenize in different processes: ids must not follow hash seeds."""
    code = (
        "from engines.models.internvl import tiny_tokenizer as t; "
        "print(t()('<|im_start|>user\\n<img><IMG_CONTEXT></img>a red circle<|im_end|>').input_ids)"
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
    assert len(outs) == 1
    ids = ast.literal_eval(outs.pop().strip())
    assert ids[0] == 257 and ids[6:9] == [259, 261, 260]  # <|im_start|> "user\n" <img> <IMG_CONTEXT> </img>
