"""Qwen2.5-VL family on its tiny preset: the release's tokens and template, labels, placeholders, absolute-time
video positions (`second_per_grid_ts`), training signal, export and inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs import ModelConfig
from flowspeed.engines.models.qwen2_5_vl import ADDED_TOKENS, SPECIAL_TOKENS, tiny_processor, video_metadata
from flowspeed.engines.models.qwen2_vl import to_chat
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample, prompt_of

from tests.engines.models.chats import image_and_video_chats
from tests.engines.models.test_qwen2_vl import answer_spans
from tests.engines.models.test_vlm_reference_encodings import QWEN2_VL_MASK, QWEN2_VL_TEXT, SAMPLE, runs

FAM = get_family("qwen2_5_vl")
CFG = ModelConfig(family="qwen2_5_vl", max_text_length=256)
# image -> 28x56 px: grid (1, 2, 4); 3 frames padded to 4 -> grid (2, 2, 2), sampled at 1.5 fps
# (3 frames from a 2 s clip at 30 fps: 3 / 60 * 30)
RNG = np.random.default_rng(1)
IMAGE_CHAT, VIDEO_CHAT = image_and_video_chats((3, 30, 30), video_fps=1.5)
# Qwen2.5-VL-*-Instruct tokenizer_config.json added_tokens_decoder: the release's ids of the added tokens
RELEASE_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
               "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
               "<tool_call>": 151657, "<|file_sep|>": 151664}  # fmt: skip


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


@pytest.fixture(scope="module")
def model():
    return FAM.load_model(CFG)


def test_release_tokens_template_and_tiny_architecture(processor, model) -> None:
    tok = processor.tokenizer
    # the release's order: ids offset from <|endoftext|> as in the release; tool/FIM tokens are not special
    assert len(tok) == 256 + len(SPECIAL_TOKENS) + len(ADDED_TOKENS) == 278
    assert {t: tok.convert_tokens_to_ids(t) - 256 + 151643 for t in RELEASE_IDS} == RELEASE_IDS
    assert tok.decode(tok("<tool_call><|im_end|>")["input_ids"], skip_special_tokens=True) == "<tool_call>"
    # LLaMA-Factory's qwen2_vl template (its template for Qwen2.5-VL too) on the same conversation: the release's
    # chat template renders the same text, and the answers, <|im_end|> and the newline after it are trained
    enc = FAM.encode_sample(processor, SAMPLE, 4096)
    assert tok.decode(enc["input_ids"]) == QWEN2_VL_TEXT and runs(enc["labels"]) == QWEN2_VL_MASK
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    labelled = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert labelled.endswith(
        "user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )
    # window attention in all but the fullatt blocks, RMSNorm + SwiGLU blocks, merger into the text width
    vision = model.config.vision_config
    assert (vision.fullatt_block_indexes, vision.window_size, vision.tokens_per_second) == ([1], 28, 2)
    block = model.model.visual.blocks[0]
    assert type(block.norm1).__name__.endswith("RMSNorm") and hasattr(block.mlp, "gate_proj")
    assert model.model.visual.merger.mlp[-1].out_features == model.config.text_config.hidden_size


def test_image_chat_labels_and_placeholders(processor, model) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == enc["mm_token_type_ids"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    assert answer_spans(processor.tokenizer, enc) == ["A red circle.<|im_end|>\n", "Top left.<|im_end|>\n"]
    assert enc["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert enc["pixel_values"].shape == (8, 3 * 2 * 14 * 14)  # t*h*w patches of (C, temporal 2, 14, 14)
    image_tokens = (enc["input_ids"] == model.config.image_token_id).sum()
    assert image_tokens == 8 // 4 == (enc["mm_token_type_ids"] == 1).sum()  # 2x2 patches merge into one token
    assert "pixel_values_videos" not in enc and "second_per_grid_ts" not in enc


def test_video_seconds_per_temporal_patch_are_those_of_the_sampled_frames(processor, model) -> None:
    enc = FAM.encode_sample(processor, VIDEO_CHAT, CFG.max_text_length)
    assert answer_spans(processor.tokenizer, enc) == ["Yes, to the right.<|im_end|>\n"]
    assert enc["video_grid_thw"].tolist() == [[2, 2, 2]] and enc["pixel_values_videos"].shape == (8, 1176)
    assert (enc["input_ids"] == model.config.video_token_id).sum() == (enc["mm_token_type_ids"] == 2).sum() == 2
    # temporal_patch_size / sampled fps = 2 / 1.5 s, exactly what the processor computes when it reads the clip
    # itself: its VideoMetadata of the 60-frame 30 fps file with frames 0, 30, 59 sampled
    assert enc["second_per_grid_ts"].tolist() == pytest.approx([2 / 1.5])
    text = processor.apply_chat_template(to_chat(VIDEO_CHAT), tokenize=False)
    own = processor(text=[text], videos=VIDEO_CHAT.videos, return_tensors="pt",
                    video_metadata=[{"total_num_frames": 60, "fps": 30.0, "frames_indices": [0, 30, 59]}])  # fmt: skip
    assert torch.equal(own["second_per_grid_ts"], enc["second_per_grid_ts"])
    # fps unknown: the processor's own default (24 fps), as without metadata
    unknown = SequenceSample(messages=VIDEO_CHAT.messages, videos=VIDEO_CHAT.videos)
    assert FAM.encode_sample(processor, unknown, 256)["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])
    assert video_metadata([prompt_of(VIDEO_CHAT)])[0]["fps"] == 1.5  # the eval prompt keeps the rate


def test_collated_seconds_reach_the_models_time_positions(processor, model) -> None:
    """second_per_grid_ts is concatenated like the grids, and the model's M-RoPE spaces the video's temporal patches
    tokens_per_second * seconds apart: the same frames at another frame rate are different inputs."""
    slow = SequenceSample(messages=VIDEO_CHAT.messages, videos=VIDEO_CHAT.videos, video_fps=[0.5])  # 4 s per patch
    items = [FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT, slow)]
    batch = FAM.collate(items)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / 1.5, 4.0])
    assert batch["pixel_values"].shape == (8, 1176) and batch["pixel_values_videos"].shape == (16, 1176)
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask", "mm_token_type_ids")
    positions, _ = model.model.get_rope_index(batch["input_ids"], **{k: batch[k] for k in keys})  # (3, B, L)
    for row, seconds in ((1, 2 / 1.5), (2, 4.0)):
        video = batch["mm_token_type_ids"][row] == 2
        t = positions[0, row][video]  # 2 temporal patches x 1 merged token each
        assert (t[1] - t[0]).item() == int(2 * seconds)  # tokens_per_second 2
    with torch.no_grad():
        a = model(**FAM.collate(items[1:2])).logits
        b = model(**FAM.collate(items[2:3])).logits
    assert not torch.allclose(a, b)


@pytest.fixture
def one_thread():
    """Toy matmuls gain nothing from intra-op threads and lose much to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(processor, tmp_path: Path, one_thread) -> None:
    """Labels, collate, loss, export and the respond prompt agree: a memorised batch is answered back."""
    model = FAM.load_model(CFG).train()
    batch = FAM.collate([FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = FAM.training_loss(model, None, batch, torch.Generator())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(278): a random init knows nothing
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2  # learning by step 20, memorised by 50

    FAM.save_pretrained(tmp_path, CFG, model.eval())
    assert type(FAM.load_export(tmp_path, torch.device("cpu"))[1]).__name__ == "Qwen2_5_VLProcessor"
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]  # batched, left-padded, each after its own media


def test_lora_targets_are_the_language_model_attention(model) -> None:
    names = [n for n, _ in model.named_modules() if n.endswith(FAM.lora_targets)]
    assert len(names) == 2 * 4 and all(n.startswith("model.language_model.layers.") for n in names)
    assert tiny_processor().video_processor.temporal_patch_size == 2


def test_prep_records_the_sampled_frame_rate_of_a_decoded_clip(processor, tmp_path: Path) -> None:
    """Prep's decode (4 of a 10-frame 5 fps clip) hands the processor the frame rate transformers' own video loader
    would report for the same sampling (VideoMetadata.sampled_fps = 4 / 10 * 5 = 2 fps -> 1 s per temporal patch)."""
    from flowspeed.configs import load_config
    from flowspeed.datasets_prep.demo import write_mp4
    from flowspeed.datasets_prep.manifest import Entry
    from flowspeed.datasets_prep.sequence_prep import load_sample

    from tests.conftest import REPO

    clip = tmp_path / "clip.mp4"
    write_mp4(clip, RNG.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), 5)
    cfg = load_config(REPO / "configs" / "pipelines" / "qwen2_5_vl-sft.yaml", ["data.num_frames=4"], tmp_path)
    turns = [{"from": "human", "value": "<video>\nDoes it move?"}, {"from": "gpt", "value": "No."}]
    sample = load_sample(Entry(1, clip, None, (clip,), {"messages": turns}, (tmp_path,)), FAM, cfg)
    assert [v.shape[0] for v in sample.videos] == [4] and sample.video_fps == pytest.approx([2.0])
    enc = FAM.encode_sample(processor, sample, 256)
    assert enc["second_per_grid_ts"].tolist() == pytest.approx([1.0])
