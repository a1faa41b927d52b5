"""Qwen2-VL on the megatron engine: the HF vision tower feeding a megatron GPTModel with multimodal RoPE gives
transformers' logits, on 1 rank and on 2 tensor-parallel gloo ranks with and without sequence parallelism."""

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


def _megatron_logits(rank: int, world: int, sp: bool) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from engines.megatron.convert import hf_to_megatron
    from engines.megatron.gpt import DecoderShape, transformer_config
    from engines.megatron.setup import init_model_parallel
    from engines.megatron.vlm import Qwen2VLMegatron, mrope_position_ids, split_hf_state

    hf = tiny_qwen2_vl()
    shape = DecoderShape.from_hf(hf.config)
    init_model_parallel(tp=world)
    config = transformer_config(shape, tensor_model_parallel_size=world, sequence_parallel=sp)
    model = Qwen2VLMegatron(hf.config, config, parallel_output=False)
    decoder, visual = split_hf_state(hf.state_dict())
    part = {f"language_model.{k}": v for k, v in hf_to_megatron(decoder, shape, tp=world, tp_rank=rank).items()}
    part.update({f"visual.{k}": v for k, v in visual.items()})
    missing, unexpected = model.load_state_dict(part, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    batch = vlm_batch()
    media = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        logits = model(batch["input_ids"], mrope_position_ids(hf.config, batch), **media)
    ps.destroy_model_parallel()
    return logits


@pytest.mark.parametrize(("tp", "sp"), [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2+sp"])
def test_megatron_qwen2_vl_gives_the_transformers_logits(tp: int, sp: bool) -> None:
    hf = tiny_qwen2_vl()
    batch = vlm_batch()
    with torch.no_grad():
        expected = hf(**batch).logits
    mask = batch["attention_mask"].bool()  # padded positions are nobody's prediction
    for logits in run_ranks(_megatron_logits, tp, sp):
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits[mask], expected[mask], atol=1e-4, rtol=1e-4)
