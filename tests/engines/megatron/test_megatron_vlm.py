"""VLMs on the megatron engine: the HF vision tower feeding a megatron GPTModel gives transformers' logits, on 1
rank and on 2 tensor-parallel gloo ranks with and without sequence parallelism: Qwen2-VL (multimodal RoPE) and
LLaVA (CLIP tower, projector, Llama decoder)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

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


CASES = {"qwen2_vl": (tiny_qwen2_vl, vlm_batch), "llava": (tiny_llava, llava_batch)}


def _all_logits(rank: int, world: int, sps: list[bool]) -> dict[tuple[str, bool], torch.Tensor]:
    """Every family and SP setting in one pair of processes (megatron's state torn down in between)."""
    return {(family, sp): _megatron_logits(rank, world, sp, family) for family in CASES for sp in sps}


def _megatron_logits(rank: int, world: int, sp: bool, family: str = "qwen2_vl") -> torch.Tensor:
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
    media = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    with torch.no_grad():
        logits = model(batch["input_ids"], cls.positions(hf.config, batch), **media)
    ps.destroy_model_parallel()
    return logits


@pytest.mark.parametrize(("tp", "sps"), [(1, [False]), (2, [False, True])], ids=["tp1", "tp2-and-tp2+sp"])
def test_megatron_vlms_give_the_transformers_logits(tp: int, sps: list[bool]) -> None:
    expected = {}
    for family, (make_model, make_batch) in CASES.items():
        batch = make_batch()
        with torch.no_grad():
            expected[family] = make_model()(**batch).logits, batch["attention_mask"].bool()
    for results in run_ranks(_all_logits, tp, sps):
        for (family, sp), logits in results.items():
            want, mask = expected[family]  # padded positions are nobody's prediction
            assert logits.shape == want.shape, (family, sp)
            torch.testing.assert_close(logits[mask], want[mask], atol=1e-4, rtol=1e-4, msg=f"{family} tp={tp} sp={sp}")
