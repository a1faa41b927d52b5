"""Qwen3-VL family, dense and MoE tiny presets: the release's tokens and template, labels, timestamped videos,
training signal, export, LoRA interop, and FSDP2 of the MoE decoder through the engine.

Reference facts (outside the project):
- Special-token ids: Qwen3-VL-*-Instruct tokenizer_config.json added tokens, <|endoftext|> 151643 ... <|video_pad|>
  151656 special, <tool_call> 151657 ... </think> 151668 not; config.json image_token_id 151655, video_token_id
  151656, vision_start_token_id 151652, vision_end_token_id 151653.
- Chat template: Qwen3-VL-*-Instruct's (the `render_content` macro version) renders no default system turn; its
  structure is ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n`, images/videos as
  `<|vision_start|><|image_pad|><|vision_end|>` / `<|video_pad|>`, generation prompt `<|im_start|>assistant\\n`.
  LLaMA-Factory src/llamafactory/data/template.py `qwen3_vl` / `qwen3_vl_nothink` agree (no default_system).
- Trained tokens: `answer<|im_end|>\\n` (LLaMA-Factory's qwen3_vl assistant slot `{{content}}<|im_end|>\\n`;
  QwenLM/Qwen3-VL qwen-vl-finetune/qwenvl/data/data_processor.py preprocess_qwen_visual labels from after
  `<|im_start|>assistant\\n` through <|im_end|> and the token after it).
- Video placeholders: transformers 5.25 Qwen3VLProcessor.replace_video_token, `<{t:.1f} seconds>` then
  `<|vision_start|>` + one `<|video_pad|>` per merged patch of the frame group + `<|vision_end|>`, per 2-frame
  group, t the mean timestamp of the group's frames (`_calculate_timestamps`).
"""

from __future__ import annotations

import json
from pathlib import Path

import flowspeed.engines.models.qwen3_vl  # noqa: F401  (registers the family)
import pytest
import torch
from flowspeed.configs import ComponentConfig, ModelConfig, PipelineConfig, load_config
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from tests.conftest import REPO
from tests.engines.models.chats import image_and_video_chats

FAM = get_family("qwen3_vl")
PRESETS = ("tiny", "tiny-moe")
# image -> 32x64 px: grid (1, 2, 4); 4 frames of 32x32 px: grid (2, 2, 2)
IMAGE_CHAT, VIDEO_CHAT = image_and_video_chats((4, 40, 40), video_fps=4.0)


def _cfg(preset: str = "tiny", **kwargs: object) -> ModelConfig:
    return ModelConfig(family="qwen3_vl", transformer=ComponentConfig(preset=preset), max_text_length=256, **kwargs)


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(_cfg())


def answer_spans(tokenizer, enc: dict[str, torch.Tensor]) -> list[str]:
    """Decoded runs of labelled tokens, one per assistant answer."""
    keep = (enc["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in keep:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tokenizer.decode(enc["input_ids"][r]) for r in runs]


def test_special_tokens_and_chat_template_are_the_release_s(processor) -> None:
    tok = processor.tokenizer
    release = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
               "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
               "<think>": 151667, "</think>": 151668}  # fmt: skip
    assert {t: tok.convert_tokens_to_ids(t) - 256 for t in release} == {t: i - 151643 for t, i in release.items()}
    assert len(tok) == 256 + 151668 - 151643 + 1
    model = FAM.load_model(_cfg())
    c = model.config
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == (
        tuple(
            release[t] - 151643 + 256 for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        )
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok("<think>ok</think><|im_end|>").input_ids, skip_special_tokens=True) == "<think>ok</think>"

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi?"}]},
            {"role": "assistant", "content": "Yes."}]  # fmt: skip
    assert processor.apply_chat_template(chat, tokenize=False) == (  # no default system turn (Qwen2-VL had one)
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "Hi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_labels_cover_exactly_the_answers_and_images_expand_per_merged_patch(processor) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, 256)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == enc["mm_token_type_ids"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    assert answer_spans(processor.tokenizer, enc) == ["A red circle.<|im_end|>\n", "Top left.<|im_end|>\n"]
    assert enc["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert enc["pixel_values"].shape == (8, 3 * 2 * 16 * 16)  # t*h*w patches of (C, temporal 2, 16, 16)
    image_tokens = int((enc["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == 8 // 4 == int((enc["mm_token_type_ids"] == 1).sum())  # 2x2 patches merge into one token
    assert processor.tokenizer.decode(enc["input_ids"]).startswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is in the picture?"
    )
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)


def test_videos_render_a_timestamp_before_each_frame_group(processor) -> None:
    enc = FAM.encode_sample(processor, VIDEO_CHAT, 256)
    assert answer_spans(processor.tokenizer, enc) == ["Yes, to the right.<|im_end|>\n"]
    assert enc["video_grid_thw"].tolist() == [[2, 2, 2]] and enc["pixel_values_videos"].shape == (8, 1536)
    group = "<|vision_start|><|video_pad|><|vision_end|>"  # 2x2 patches of a 2-frame group: one merged token
    text = processor.tokenizer.decode(enc["input_ids"])
    # frames 0..3 at 4 fps: groups (0, 0.25) s and (0.5, 0.75) s, each printed at its mean, one decimal
    assert f"<|im_start|>user\n<0.1 seconds>{group}<0.6 seconds>{group}Does it move?<|im_end|>" in text
    assert int((enc["mm_token_type_ids"] == 2).sum()) == 2 == int((enc["input_ids"] == processor.video_token_id).sum())
    # no frame rate recorded: consecutive frames at Qwen3-VL's own 2 fps sampling
    unknown = FAM.encode_sample(processor, SequenceSample(messages=VIDEO_CHAT.messages, videos=VIDEO_CHAT.videos), 256)
    assert f"<0.2 seconds>{group}<1.2 seconds>{group}" in processor.tokenizer.decode(unknown["input_ids"])

    batch = FAM.collate([FAM.encode_sample(processor, s, 256) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    assert batch["pixel_values"].shape == batch["pixel_values_videos"].shape == (8, 1536)
    assert batch["image_grid_thw"].shape == batch["video_grid_thw"].shape == (1, 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_row_gives_the_padded_batch_s_loss(processor, preset: str) -> None:
    """encode_sample's per-sample tensors pack into one row (sequence.py `pack`): per-sample M-RoPE from the
    model's own get_rope_index, DeepStack features added at the same positions, the same loss as padding."""
    items = [FAM.encode_sample(processor, s, 256) for s in (IMAGE_CHAT, VIDEO_CHAT)]
    model = FAM.load_model(_cfg(preset))
    with torch.no_grad():
        padded = FAM.training_loss(model, None, FAM.collate(items), torch.Generator())
        packed = FAM.training_loss(model, None, FAM.pack(items), torch.Generator())
    torch.testing.assert_close(packed, padded, atol=1e-6, rtol=0)


# one short answer each (a few bytes to memorise): the same media and template as above
LEARN = [
    SequenceSample(messages=[{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
                   images=IMAGE_CHAT.images),
    SequenceSample(messages=[{"role": "user", "content": "Moves?"}, {"role": "assistant", "content": "Yes, right."}],
                   videos=VIDEO_CHAT.videos, video_fps=VIDEO_CHAT.video_fps),
]  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(processor, preset: str, tmp_path: Path) -> None:
    """Labels, collate, loss, export and the respond prompt agree: a batch memorised in 20 steps is answered back,
    by the dense and the MoE class (the export's config.json picks it)."""
    cfg = _cfg(preset)
    model = FAM.load_model(cfg).train()
    moe = preset == "tiny-moe"
    assert type(model) is (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok) == (4, 2) if moe else not hasattr(text, "num_experts")
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]  # DeepStack: 2 taps into layers 0 and 1
    assert text.rope_parameters["mrope_interleaved"] and sum(text.rope_parameters["mrope_section"]) == 16 // 2
    batch = FAM.collate([FAM.encode_sample(processor, s, 256) for s in LEARN])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = FAM.training_loss(model, None, batch, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(282): a random init knows nothing
    assert losses[9] < 0.5 * losses[0] and losses[-1] < 0.1 * losses[0]

    FAM.save_pretrained(tmp_path, cfg, model.eval())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ("qwen3_vl_moe" if moe else "qwen3_vl")
    answers = FAM.respond(tmp_path, LEARN, max_new_tokens=16, device=torch.device("cpu"))
    assert answers == ["Red.", "Yes, right."]  # batched, left-padded, each after its own media
    reloaded = FAM.load_model(ModelConfig(family="qwen3_vl", transformer=ComponentConfig(pretrained=str(tmp_path))))
    assert type(reloaded) is type(model)


def test_lora_adapter_loads_in_peft_like_the_merged_export(tmp_path: Path) -> None:
    """The run's adapter export (final/lora) read by peft's own PeftModel.from_pretrained gives the merged export's
    logits; LoRA adapts the decoder's attention only (the tower's attention is qkv/proj)."""
    from flowspeed.engines.export import export_weights, plain_model
    from peft import PeftModel

    cfg = PipelineConfig.model_validate({"workdir": str(tmp_path), "model": {"family": "qwen3_vl"},
                                         "train": {"lora": {"enabled": True, "rank": 4, "alpha": 8.0}}})  # fmt: skip
    trained = plain_model(FAM, cfg, {})
    adapted = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and n.startswith("model.language_model.") for n in adapted)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:  # peft starts B at zero: give the adapters an effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    final = export_weights(FAM, cfg, {}, trained.state_dict(), tmp_path / "final")
    ids = {"input_ids": torch.randint(0, 250, (1, 12), generator=g)}
    merged = FAM.load_model(cfg.model.model_copy(update={"transformer": ComponentConfig(pretrained=str(final))}))
    peft_model = PeftModel.from_pretrained(FAM.load_model(cfg.model), final / "lora")
    with torch.no_grad():
        base_logits = FAM.load_model(cfg.model)(**ids).logits
        merged_logits = merged(**ids).logits
        assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
        torch.testing.assert_close(peft_model(**ids).logits, merged_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_fsdp2_units_are_the_decoder_layers_and_vision_blocks_and_the_tower_freezes(preset: str) -> None:
    """engines/torch_engine/parallelize.py finds Qwen3-VL's blocks with no entry of its own: each decoder layer (an
    MoE layer with its router and all its experts) is one FSDP2/AC/compile unit, the vision blocks are found too.
    A full finetune trains the merger only of the tower, as QwenLM's qwen-vl-finetune does."""
    from flowspeed.engines.torch_engine.parallelize import block_lists

    with torch.device("meta"):
        model = FAM.load_model(_cfg(preset))
    found = block_lists(model)
    assert found[0] is model.model.language_model.layers and any(b is model.model.visual.blocks for b in found)
    if preset == "tiny-moe":
        names = {n for n, _ in found[0][0].named_parameters()}
        assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"} <= names
    FAM.set_trainable(model, _cfg(preset))
    trainable = {
        n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.visual")
    }
    assert trainable == {"merger"}  # patch_embed, pos_embed, blocks and the DeepStack mergers stay frozen
    assert FAM.frozen_prefixes(_cfg(preset, freeze_vision_tower=False)) == ()


@pytest.mark.slow
def test_moe_fsdp2_on_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    """configs/pipelines/qwen3_vl_moe-sft.yaml as shipped (FSDP2 over 2 ranks, tiny-moe) through the engine, one
    torchrun job, against one process accumulating the same 2 micro-batches: the same losses within 1e-5."""
    from flowspeed.datasets_prep.demo import make_demo_dataset
    from flowspeed.datasets_prep.prep import run_prep
    from flowspeed.engines.launch import launch

    from tests.engines.torch_engine.runs_job import result, run_together

    make_demo_dataset(tmp_path / "demo", num_videos=2, num_images=2)  # conversations about clips and stills
    recipe = REPO / "configs" / "pipelines" / "qwen3_vl_moe-sft.yaml"
    steps = ["train.max_steps=3", "train.checkpoint_every=100", "train.warmup_steps=0", "train.val_fraction=0",
             f"data.manifest={tmp_path / 'demo' / 'conversations.jsonl'}"]  # fmt: skip
    single = ["train.nproc_per_node=1", "train.parallel.dp_shard=1", "train.grad_accum=2"]
    one = load_config(recipe, [*steps, *single], workdir=tmp_path / "one")
    run_prep(one)
    shared = [f"data.output_dir={one.prep_dir}", f"data.cache_dir={one.cache_dir}"]
    two = load_config(recipe, [*steps, *shared], workdir=tmp_path / "two")
    assert (two.train.nproc_per_node, two.train.parallel.dp_shard, two.model.transformer.preset) == (2, 2, "tiny-moe")
    job_error = run_together({"fsdp2-moe": two}, 2)
    baseline = launch(one, None, None).losses
    losses = result({"fsdp2-moe": two}, "fsdp2-moe", job_error).losses
    assert len(losses) == 3 and losses == pytest.approx(baseline, abs=1e-5)


def test_mfu_counts_the_routed_experts_a_token_runs() -> None:
    """MoE FLOPs per token: the shared parameters plus top-k of the routed experts (2 of 4 in tiny-moe)."""
    from flowspeed.engines.torch_engine.trainer import _active_parameters

    model = FAM.load_model(ModelConfig(family="qwen3_vl", transformer=ComponentConfig(preset="tiny-moe")))
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0 and _active_parameters(model, model) == total - routed // 2
    dense = FAM.load_model(ModelConfig(family="qwen3_vl"))
    assert _active_parameters(dense, dense) == sum(p.numel() for p in dense.parameters())
