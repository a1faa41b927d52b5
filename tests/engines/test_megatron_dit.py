"""diffusers CogVideoX transformer <-> the megatron-core CogVideoX DiT: the same noise prediction at tensor
parallel size 1 and 2 (real gloo ranks), the way back equal to the diffusers state dict, TP=2 training equal to
TP=1, and refusals for layouts and configs it cannot hold.

All megatron runs share one 2-process job (spawning and importing megatron dominate the cost): TP=2 first, then
megatron's groups rebuilt at TP=1, where each process holds a whole model."""

from __future__ import annotations

import functools

import pytest
import torch

from engines.megatron.dit import (
    CogVideoXShape,
    diffusers_to_megatron_dit,
    megatron_dit_to_diffusers,
    transformer_config,
)
from tests.distributed import run_ranks

_COMMON = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
               text_embed_dim=32, time_embed_dim=32, sample_frames=5, patch_size=2, max_text_seq_length=8)  # fmt: skip
_VARIANTS = {
    # CogVideoX-5B: 3D RoPE; a training grid (6x6 patches) unlike the input's (4x6), so the RoPE crop shows
    "rope": dict(use_rotary_positional_embeddings=True, sample_height=12, sample_width=12),
    # CogVideoX-2B: fixed 3D sincos positions added in the patch embedding
    "sincos": dict(use_rotary_positional_embeddings=False, sample_height=8, sample_width=12),
    # CogVideoX-5B-I2V: RoPE plus a learned positional embedding (a parameter-like buffer in the state dict)
    "rope_learned": dict(
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, sample_height=8, sample_width=12
    ),
}
_STEPS = 5
Result = tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]


def _diffusers_model(variant: str) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**_COMMON, **_VARIANTS[variant])
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        if variant == "rope_learned":
            model.patch_embed.pos_embedding.add_(torch.randn_like(model.patch_embed.pos_embedding) * 0.1)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 2, 4, 8, 12, generator=g)  # [B, F, C, H, W]
    text = torch.randn(2, 8, 32, generator=g)
    timestep = torch.tensor([10, 700])
    target = torch.randn(2, 2, 4, 8, 12, generator=g)
    return latents, text, timestep, target


def _diffusers_prediction(model: torch.nn.Module, variant: str) -> torch.Tensor:
    """What the diffusers pipeline computes: RoPE from the pipeline's own helpers, passed in."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    latents, text, timestep, _ = _inputs()
    rotary = None
    if _VARIANTS[variant]["use_rotary_positional_embeddings"]:
        cfg, grid = model.config, (latents.shape[3] // 2, latents.shape[4] // 2)
        crop = get_resize_crop_region_for_grid(grid, cfg.sample_width // 2, cfg.sample_height // 2)
        rotary = get_3d_rotary_pos_embed(cfg.attention_head_dim, crop, grid, latents.shape[1])
    with torch.no_grad():
        return model(latents, text, timestep, image_rotary_emb=rotary, return_dict=False)[0]


def _megatron_job(rank: int, world: int, models: dict[str, tuple[dict, dict]]) -> dict[tuple[int, str], Result]:
    """On each rank, at TP=world and then TP=1 (the same processes, megatron's groups rebuilt, to pay the
    spawn and import cost once): convert, predict, hand back the state dict, then train a few steps."""
    from megatron.core import parallel_state

    from engines.megatron.dit import CogVideoXDiT, transformer_config
    from engines.megatron.setup import init_model_parallel

    latents, text, timestep, target = _inputs()
    results: dict[tuple[int, str], Result] = {}
    for tp in (world, 1):
        parallel_state.destroy_model_parallel()
        init_model_parallel(tp=tp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for variant, (config, reference) in models.items():
            shape = CogVideoXShape.from_diffusers(config)
            model = CogVideoXDiT(transformer_config(shape, tensor_model_parallel_size=tp), shape)
            missing, unexpected = model.load_state_dict(
                diffusers_to_megatron_dit(reference, tp=tp, tp_rank=tp_rank), strict=False
            )
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
            model.eval()
            with torch.no_grad():
                prediction = model(latents, text, timestep)
            state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses = []
            for _ in range(_STEPS):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(latents, text, timestep), target)
                loss.backward()
                model.allreduce_qk_norm_grads()
                optimizer.step()
                losses.append(loss.item())
            results[(tp, variant)] = (prediction, state, losses)
    return results


@functools.cache
def _results() -> dict[tuple[int, str], list[Result]]:
    """One 2-rank gloo job for every (tp, variant): {(tp, variant): [what each TP rank returned]}."""
    models = {v: (dict(m.config), m.state_dict()) for v in _VARIANTS for m in [_diffusers_model(v)]}
    per_rank = run_ranks(_megatron_job, 2, models)
    out = {key: [r[key] for r in per_rank] for key in per_rank[0]}
    return {(tp, v): ranks[:tp] for (tp, v), ranks in out.items()}  # at TP=1 both ranks hold a whole model


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("tp", [1, 2])
def test_converted_dit_predicts_what_diffusers_does_and_converts_back(tp: int, variant: str) -> None:
    reference = _diffusers_model(variant)
    expected = _diffusers_prediction(reference, variant)
    results = _results()[(tp, variant)]
    assert len(results) == tp
    for prediction, _, _ in results:
        assert prediction.shape == expected.shape
        torch.testing.assert_close(prediction, expected, atol=1e-4, rtol=1e-4)
    # the megatron modules' own state dicts (one per TP rank) back to diffusers: equal to the original
    back = megatron_dit_to_diffusers([state for _, state, _ in results])
    original = reference.state_dict()
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_tensor_parallel_training_matches_a_single_rank(variant: str) -> None:
    single = _results()[(1, variant)][0][2]
    for _, _, losses in _results()[(2, variant)]:
        assert len(losses) == _STEPS and losses[-1] < losses[0]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), atol=1e-5, rtol=0)


def test_fused_qkv_rows_are_per_head_q_k_v_and_split_by_heads() -> None:
    state = _diffusers_model("rope").state_dict()
    a = "transformer_blocks.1.attn1."
    shards = [diffusers_to_megatron_dit(state, tp=2, tp_rank=r) for r in range(2)]
    qkv = shards[1]["blocks.1.self_attention.linear_qkv.weight"]  # rank 1 holds heads 2 and 3
    d = 16
    assert torch.equal(qkv[:d], state[f"{a}to_q.weight"][2 * d : 3 * d])
    assert torch.equal(qkv[d : 2 * d], state[f"{a}to_k.weight"][2 * d : 3 * d])
    assert torch.equal(qkv[5 * d : 6 * d], state[f"{a}to_v.weight"][3 * d : 4 * d])
    back = megatron_dit_to_diffusers(shards)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_impossible_layouts_and_unsupported_configs_are_refused() -> None:
    state = _diffusers_model("rope").state_dict()
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not divide the attention heads \(4\)"):
        diffusers_to_megatron_dit(state, tp=3, tp_rank=0)
    with pytest.raises(ValueError, match=r"tensor parallel size 8 does not divide the attention heads \(4\)"):
        transformer_config(CogVideoXShape.from_diffusers({**_COMMON}), tensor_model_parallel_size=8)
    with pytest.raises(ValueError, match="patch_size_t=2 \\(CogVideoX 1.5"):
        CogVideoXShape.from_diffusers({**_COMMON, "patch_size_t": 2})
    with pytest.raises(ValueError, match="ofs_embed_dim=512"):
        CogVideoXShape.from_diffusers({**_COMMON, "ofs_embed_dim": 512})
    with pytest.raises(ValueError, match="no place for"):
        diffusers_to_megatron_dit({**state, "transformer_blocks.0.attn1.to_qkv.weight": torch.zeros(1)})
