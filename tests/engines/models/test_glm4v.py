"""GLM-4.1V family on its tiny preset: the release's template and tokens, LLaMA-Factory's labels, video timestamps,
mixed image/video batches, training signal, export and inference.

Reference facts, each with its source:
- the chat template is zai-org/GLM-4.1V-9B-Thinking's chat_template (as quoted by sgl-project/sglang
  test/srt/test_jinja_template_utils.py `test_detect_msg_content_pattern`); the rendered strings below follow it;
- special-token ids: GLM-4's <|endoftext|> 151329 .. <|end_of_video|> 151342 (THUDM glm-4-9b tokenization_chatglm.py)
  and <|image|> 151343, <|video|> 151344 (Glm4vConfig image_token_id / video_token_id defaults);
- masking: hiyouga/LLaMA-Factory src/llamafactory/data/template.py `glm4v` (format_user `<|user|>\\n{{content}}
  <|assistant|>`, format_assistant `\\n{{content}}`, format_prefix `[gMASK]<sop>`, efficient_eos, ReasoningTemplate
  with thought words ("<think>\\n", "\\n</think>\\n\\n")) and processor/supervised.py (efficient_eos labels);
- video structure: transformers 5.25 Glm4vProcessor.replace_frame_token_id (`<|begin_of_image|>` + tokens +
  `<|end_of_image|>` + whole seconds, every other frame's timestamp).
"""

from __future__ import annotations

from pathlib import Path

import flowspeed.engines.models.glm4v as glm4v
import pytest
import torch
from flowspeed.configs import ModelConfig
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample

from tests.engines.models.chats import image_and_video_chats

FAM = get_family("glm4v")
CFG = ModelConfig(family="glm4v", max_text_length=256)
# image -> 28x56 px: grid (1, 2, 4), 2 merged tokens; 4 frames -> grid (2, 2, 2): 2 x 1 token
IMAGE_CHAT, VIDEO_CHAT = image_and_video_chats((4, 30, 30))
RELEASE_IDS = {"<|endoftext|>": 151329, "[gMASK]": 151331, "<sop>": 151333, "<|system|>": 151335, "<|user|>": 151336,
               "<|assistant|>": 151337, "<|observation|>": 151338, "<|begin_of_image|>": 151339,
               "<|end_of_image|>": 151340, "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342,
               "<|image|>": 151343, "<|video|>": 151344}  # fmt: skip


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


@pytest.fixture(scope="module")
def encoded(processor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return FAM.encode_sample(processor, IMAGE_CHAT, 256), FAM.encode_sample(processor, VIDEO_CHAT, 256)


def test_release_template_and_special_tokens(processor) -> None:
    tok = processor.tokenizer
    for token, release_id in RELEASE_IDS.items():  # the release's order: tiny id - 256 == release id - 151329
        assert tok.convert_tokens_to_ids(token) - 256 == release_id - 151329, token
    for token in ("<think>", "</think>", "<answer>", "</answer>"):  # single tokens, as the authors' scripts use them
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A."}, {"role": "user", "content": "Where?"}]  # fmt: skip
    assert processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
        "<|begin_of_video|><|video|><|end_of_video|>What?<|assistant|>\nA.<|user|>\nWhere?<|assistant|>\n"
    )
    model = FAM.load_model(CFG)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(list(glm4v.STOP_TOKENS))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image|>")


def llama_factory_glm4v(tok, sample: SequenceSample) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's glm4v encoding of a text-only conversation (encode_multiturn + supervised.py, enable_thinking
    on, efficient_eos), with the one change `with_thought` makes: the empty thought after the assistant slot's
    `\\n` instead of before it."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    msgs = sample.messages
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    msgs = msgs[1:] if system is not None else msgs
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    labels: list[int] = []
    for turn, (user, answer) in enumerate(zip(msgs[::2], msgs[1::2], strict=True)):
        source = enc(("[gMASK]<sop>" + (f"<|system|>\n{system}" if system else "")) if turn == 0 else "")
        source += enc(f"<|user|>\n{user['content']}<|assistant|>")
        target = enc("\n" + glm4v.EMPTY_THOUGHT + answer["content"])
        ids += source + target
        labels += ([eos] if turn else [IGNORE_INDEX]) + [IGNORE_INDEX] * (len(source) - 1) + target
    return ids + [eos], labels + [eos]


def test_labels_are_llama_factory_glm4v_answers(processor) -> None:
    text_only = SequenceSample(messages=IMAGE_CHAT.messages)
    enc = FAM.encode_sample(processor, text_only, 256)
    ids, labels = llama_factory_glm4v(processor.tokenizer, text_only)
    assert enc["input_ids"].tolist() == ids and enc["labels"].tolist() == labels
    assert "mm_token_type_ids" in enc and "pixel_values" not in enc


def test_image_chat_tensors(processor, encoded) -> None:
    enc = encoded[0]
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == enc["mm_token_type_ids"].shape == (n,)
    tok = processor.tokenizer
    labelled = (enc["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    # the <|user|> after the first answer is labelled <|endoftext|> (efficient_eos); the sample ends with one
    assert tok.decode(enc["input_ids"][labelled]).count("<|user|>") == 1
    assert enc["labels"][-1] == enc["input_ids"][-1] == eos
    assert enc["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert enc["pixel_values"].shape == (8, 3 * 2 * 14 * 14)  # t*h*w patches of (C, temporal 2, 14, 14)
    image_tokens = enc["input_ids"] == tok.convert_tokens_to_ids("<|image|>")
    assert image_tokens.sum() == 8 // 4 == (enc["mm_token_type_ids"] == 1).sum()  # 2x2 patches merge into one token


def test_video_frames_carry_their_timestamps(processor, encoded) -> None:
    enc = encoded[1]
    tok = processor.tokenizer
    frames = "<|begin_of_image|><|image|><|end_of_image|>"
    assert f"<|user|>\n<|begin_of_video|>{frames}0{frames}1<|end_of_video|>Does it move?" in tok.decode(
        enc["input_ids"]
    )  # 4 frames at the processor's 2 fps: a temporal patch per second
    assert enc["video_grid_thw"].tolist() == [[2, 2, 2]] and enc["pixel_values_videos"].shape == (8, 1176)
    assert (enc["mm_token_type_ids"] == 2).sum() == 2 and (enc["mm_token_type_ids"] == 1).sum() == 0
    slow = SequenceSample(messages=VIDEO_CHAT.messages, videos=VIDEO_CHAT.videos)
    slow.video_fps = [0.5]  # prep's frame rate where it knows one: 2 s per frame, 4 s per temporal patch
    assert f"{frames}0{frames}4<|end_of_video|>" in tok.decode(FAM.encode_sample(processor, slow, 256)["input_ids"])
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)


def test_final_answer_drops_the_thought() -> None:
    tok = glm4v.tiny_tokenizer()
    reply = "\n<think>\nThey look like players.</think>\n<answer>Kane and Goretzka.</answer><|user|>"
    assert glm4v.final_answer(reply, tok) == "Kane and Goretzka."  # the authors' README format
    assert glm4v.final_answer("\n<think>\n\n</think>\n\nTop left.<|endoftext|><|endoftext|>", tok) == "Top left."
    assert glm4v.final_answer("\n<think>\nstill thinking", tok) == ""


def test_tiny_preset_learns_a_mixed_batch_and_answers_from_its_export(encoded, tmp_path: Path) -> None:
    """Labels, collate (an image and a video sample in one batch), loss, export and the respond prompt agree."""
    model = FAM.load_model(CFG).train()
    batch = FAM.collate(list(encoded))
    assert batch["pixel_values"].shape == batch["pixel_values_videos"].shape == (8, 1176)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        loss = FAM.training_loss(model, None, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

    FAM.save_pretrained(tmp_path, CFG, model.eval())
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]  # batched, left-padded, the empty thought stripped


def test_lora_targets_and_frozen_tower() -> None:
    model = FAM.load_model(CFG)
    names = [n for n, _ in model.named_modules() if n.endswith(FAM.lora_targets)]
    assert len(names) == 2 * 4 and all(n.startswith("model.language_model.layers.") for n in names)
    frozen = FAM.set_trainable(model, CFG)
    trainable = {
        n.split(".")[2] for n, p in frozen.named_parameters() if n.startswith("model.visual.") and p.requires_grad
    }
    assert "merger" in trainable and not trainable & {"patch_embed", "blocks"}


def test_packed_row_gives_the_padded_batch_loss_and_gradients(encoded) -> None:
    """encode_sample's per-sample tensors pack into one row (train.packing): GLM's per-sample M-RoPE, its video
    frames and the efficient_eos labels give the padded batch's loss and gradients."""
    model = FAM.load_model(CFG).to(torch.float64)

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        batch = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in batch.items()}
        model.zero_grad()
        loss = FAM.training_loss(model, None, batch, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    padded, packed = loss_and_grads(FAM.collate(list(encoded))), loss_and_grads(FAM.pack(list(encoded)))
    assert packed[0] == pytest.approx(padded[0], abs=1e-5)
    torch.testing.assert_close(packed[1], padded[1], atol=1e-5, rtol=0)
