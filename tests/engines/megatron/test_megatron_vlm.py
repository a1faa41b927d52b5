"""VLMs on the megatron engine: the HF vision tower feeding a megatron GPTModel gives transformers' logits and loss, on
1 rank and on 2 tensor-parallel gloo ranks with and without sequence parallelism: Qwen2-VL (multimodal RoPE),
Qwen2.5-VL (window-attention tower; a video with absolute time positions) and LLaVA (CLIP tower, projector, Llama
decoder)."""

from __future__ import annotations

import pytest
import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START = 250, 251, 252


def tiny_qwen2_vl() -> torch.nn.Module:
    """Qwen2-VL at toy width; a vocabulary of 256 so tensor parallelism can split it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=64),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def vlm_batch() -> dict[str, torch.Tensor]:
    """Two rows of text around one 4x4-patch image (4 merged tokens) each, the second row right-padded."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n_text in (10, 7):
        head = torch.randint(0, 240, (3,), generator=g)
        tail = torch.randint(0, 240, (n_text,), generator=g)
        rows.append(torch.cat([head, torch.tensor([VISION_START]), torch.full((4,), IMAGE_TOKEN), tail]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(2 * 16, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
    }


def tiny_llava() -> torch.nn.Module:
    """LLaVA-1.5's shape at toy width: a 56-px CLIP with 14-px patches (16 features per image), Llama decoder."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def llava_batch() -> dict[str, torch.Tensor]:
    """Two rows, each with one 56-px image (16 placeholder tokens), the second right-padded."""
    g = torch.Generator().manual_seed(2)
    rows = [torch.cat([torch.randint(0, 240, (2,), generator=g), torch.full((16,), IMAGE_TOKEN),
                       torch.randint(0, 240, (n,), generator=g)]) for n in (6, 3)]  # fmt: skip
    ids = torch.zeros(2, 24, dtype=torch.long)
    mask = torch.zeros(2, 24, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 56, 56, generator=g)}


def tiny_qwen2_5_vl() -> torch.nn.Module:
    """The qwen2_5_vl family's tiny preset (its window-attention vision tower with RMSNorm and SwiGLU: 28-px windows,
    block 1 attending over the whole image like the release's fullatt_block_indexes; M-RoPE in the decoder) with a
    vocabulary of 256 so tensor parallelism can split it."""
    from flowspeed.engines.models.qwen2_5_vl import PRESETS
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    preset = PRESETS["tiny"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, tie_word_embeddings=False, **preset["text"]),
        vision_config=dict(out_hidden_size=preset["text"]["hidden_size"], **preset["vision"]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def qwen2_5_vl_batch() -> dict[str, torch.Tensor]:
    """Row 0: a 112-px image (8x8 patches, 16 merged tokens in 16 windows); row 1: a 4-frame 56-px video (2 temporal
    patches, 8 merged tokens) at 1.5 s per temporal patch, so its time ids step by tokens_per_second * 1.5 = 3."""
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.cat([torch.randint(0, 240, (3,), generator=g), torch.tensor([VISION_START]),
                   torch.full((16,), IMAGE_TOKEN), torch.randint(0, 240, (6,), generator=g)]),
        torch.cat([torch.randint(0, 240, (2,), generator=g), torch.tensor([VISION_START]),
                   torch.full((8,), VIDEO_TOKEN), torch.randint(0, 240, (6,), generator=g)]),
    ]  # fmt: skip
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long(),
        "pixel_values": torch.randn(64, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 8, 8]]),
        "pixel_values_videos": torch.randn(32, 3 * 2 * 14 * 14, generator=g),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "second_per_grid_ts": torch.tensor([1.5]),
    }


CASES = {
    "qwen2_vl": (tiny_qwen2_vl, vlm_batch),
    "qwen2_5_vl": (tiny_qwen2_5_vl, qwen2_5_vl_batch),
    "llava": (tiny_llava, llava_batch),
}
MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _all_logits(rank: int, world: int, sps: list[bool]) -> dict[tuple[str, bool], tuple[torch.Tensor, float]]:
    """Every family and SP setting in one pair of processes (megatron's state torn down in between)."""
    return {(family, sp): _megatron_logits(rank, world, sp, family) for family in CASES for sp in sps}


def _megatron_logits(rank: int, world: int, sp: bool, family: str = "qwen2_vl") -> tuple[torch.Tensor, float]:
    """(logits, mean loss over every real next token) of the megatron chunk on the test batch."""
    from flowspeed.engines.megatron.convert import hf_to_megatron
    from flowspeed.engines.megatron.gpt import DecoderShape, transformer_config
    from flowspeed.engines.megatron.setup import init_model_parallel
    from flowspeed.engines.megatron.vlm import MODELS, split_hf_state
    from megatron.core import parallel_state as ps

    make_model, make_batch = CASES[family]
    hf = make_model()
    cls = MODELS[family]
    shape = DecoderShape.from_hf(hf.config)
    init_model_parallel(tp=world)
    config = transformer_config(shape, tensor_model_parallel_size=world, sequence_parallel=sp)
    model = cls(hf.config, config, parallel_output=False)
    decoder, vision = split_hf_state(hf.state_dict(), cls.vision_prefixes)
    part = {f"language_model.{k}": v for k, v in hf_to_megatron(decoder, shape, tp=world, tp_rank=rank).items()}
    part.update(vision)
    missing, unexpected = model.load_state_dict(part, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    batch = make_batch()
    media = {k: batch[k] for k in MEDIA if k in batch}
    positions = cls.positions(hf.config, batch)
    labels, mask = _shifted_labels(batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], positions, **media)
        # megatron's own vocab-parallel CE, on this rank's vocab shard as the engine runs it (parallel_output)
        model.language_model.output_layer.gather_output = False
        per_token = model(batch["input_ids"], positions, labels=labels.clamp(min=0), **media)
    ps.destroy_model_parallel()
    return logits, float((per_token * mask).sum() / mask.sum())


def _shifted_labels(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real token a target (the engine's labels: shifted left, -100 past each row's end) and its mask."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return labels, (labels != -100).float()


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2-and-tp2+sp"])
def test_megatron_vlms_give_the_transformers_logits(tp: int, vlm_ranks: dict[int, list[dict]]) -> None:
    """The ranks run in conftest.py's shared spawn (`_all_logits` there); tp2 runs without and with SP."""
    expected = {}
    for family, (make_model, make_batch) in CASES.items():
        batch = make_batch()
        hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # transformers shifts them
        with torch.no_grad():
            out = make_model()(**batch, labels=hf_labels)
        expected[family] = out.logits, float(out.loss), batch["attention_mask"].bool()
    for results in vlm_ranks[tp]:
        assert len(results["logits"]) == len(CASES) * tp
        for (family, sp), (logits, loss) in results["logits"].items():
            want, want_loss, mask = expected[family]  # padded positions are nobody's prediction
            assert logits.shape == want.shape, (family, sp)
            where = f"{family} tp={tp} sp={sp}"
            torch.testing.assert_close(logits[mask], want[mask], atol=1e-5, rtol=1e-5, msg=where)
            assert abs(loss - want_loss) < 1e-5, f"{where}: loss {loss} vs transformers' {want_loss}"
