"""The video families' own `training_loss` on 2 gloo ranks equals one process within 1e-5: FSDP2 (every block the
engine finds and the root sharded) for each family, and Ulysses and ring context parallel for each family whose
transformer has a plan (diffusers' `_cp_plan` for Wan and Wan I2V, ours for HunyuanVideo, HunyuanVideo 1.5 and
LTX-Video, see engines/torch_engine/context_parallel.py): every video family.

Each family is 3 AdamW steps of its loss on one tiny batch, the same batch and noise on every rank (the ranks of a CP
group are one data-parallel replica; FSDP's averaged gradients are then the one-process ones). All families run in
ONE 2-rank spawn, with Wan2.2 A14B's `train: both` (test_wan22.py `both_on_two_ranks`): the ranks' start-up
(importing torch and diffusers) is most of the cost of such a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from flowspeed.configs import ModelConfig
from flowspeed.engines.models import get_family

from tests.engines.models.family_checks import max_difference, moved, train_steps

CP = ("ulysses", "ring")


def _video(g: torch.Generator, channels: int, t: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    """A cached posterior (mean ++ logvar) of `channels` latent channels: with 2x2 patches, 8x8 is 16 tokens a frame."""
    return torch.randn(2, 2 * channels, t, h, w, generator=g)


def _wan(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"latent_params": _video(g, 16), "text_embeds": torch.randn(2, 16, 32, generator=g)}


def _wan_i2v(g: torch.Generator) -> dict[str, torch.Tensor]:
    # the 17 image and 512 text tokens stay whole on each rank under CP (diffusers' plan splits the video tokens)
    return {"latent_params": _video(g, 16), "image_condition": torch.randn(2, 20, 2, 8, 8, generator=g),
            "image_embeds": torch.randn(2, 17, 32, generator=g),
            "text_embeds": torch.randn(2, 512, 32, generator=g)}  # fmt: skip


def _hunyuanvideo(g: torch.Generator) -> dict[str, torch.Tensor]:
    # the second sample's text is mostly padding: the mask must reach every rank's attention
    return {"latent_params": _video(g, 16), "text_embeds": torch.randn(2, 8, 32, generator=g),
            "pooled_embeds": torch.randn(2, 32, generator=g),
            "text_mask": torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5]),
            "scaling_factor": torch.full((2,), 0.476986)}  # fmt: skip


def _ltx(g: torch.Generator) -> dict[str, torch.Tensor]:
    # LTX's 1x1 patches on the 128-channel latents: 2 x 4 x 4 = 32 video tokens a sample; the second sample's text is
    # mostly padding: the cross-attention mask must reach every rank
    return {"latent_params": torch.randn(2, 256, 2, 4, 4, generator=g),
            "text_embeds": torch.randn(2, 16, 32, generator=g),
            "text_mask": torch.tensor([[1.0] * 16, [1.0] * 5 + [0.0] * 11])}  # fmt: skip


def _hunyuanvideo15(g: torch.Generator) -> dict[str, torch.Tensor]:
    # 1x1 patches on 32 channels; the glyph text of the second sample is all padding, its prompt text partly
    batch = {"latent_params": torch.randn(2, 64, 2, 4, 4, generator=g), "scaling_factor": torch.ones(2),
             "text_embeds": torch.randn(2, 8, 32, generator=g), "text_mask": torch.ones(2, 8),
             "text_embeds_2": torch.randn(2, 4, 32, generator=g),
             "text_mask_2": torch.tensor([[1.0] * 4, [0.0] * 4])}  # fmt: skip
    batch["text_mask"][1, 5:] = 0
    return batch


#: family -> (max_text_length, (text width, latent channels) for `load_transformer`, the batch, the CP modes)
CASES: dict[str, tuple[int, tuple[int, int], Callable[[torch.Generator], dict[str, torch.Tensor]], tuple[str, ...]]] = {
    "wan": (16, (32, 16), _wan, CP),
    "wan_i2v": (512, (32, 16), _wan_i2v, CP),
    "hunyuanvideo": (8, (32, 16), _hunyuanvideo, CP),
    "ltx": (16, (32, 128), _ltx, CP),
    "hunyuanvideo15": (96, (32, 32), _hunyuanvideo15, CP),
}


def _families_on_two_ranks(rank: int, world: int) -> dict[str, dict[str, float]]:
    """Per family: how far training moved the weights, and the max difference of losses and weights from the
    one-process run for each layout."""
    from flowspeed.engines.torch_engine.context_parallel import apply_context_parallel, reduce_cp_grads
    from flowspeed.engines.torch_engine.parallelize import block_lists
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    out: dict[str, dict[str, float]] = {}
    for name, (text_len, args, make_batch, cp_modes) in CASES.items():
        fam, cfg = get_family(name), ModelConfig(family=name, max_text_length=text_len)
        scheduler = fam.load_scheduler(cfg)
        batch = make_batch(torch.Generator().manual_seed(3))

        def build(fam: Any = fam, cfg: ModelConfig = cfg, args: tuple[int, int] = args) -> torch.nn.Module:
            return fam.load_transformer(cfg, *args)

        ref = train_steps(fam, build(), scheduler, batch)
        result = {"moved": moved(ref[1], build())}
        for mode in (*cp_modes, "fsdp"):
            model = build()
            if mode == "fsdp":
                for blocks in block_lists(model):
                    for block in blocks:
                        fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            else:
                apply_context_parallel(model, mesh, mode)
            reduce = None if mode == "fsdp" else (lambda m: reduce_cp_grads(m, mesh))
            result[mode] = max_difference(train_steps(fam, model, scheduler, batch, reduce), ref)
        out[name] = result
    from tests.engines.models.test_wan22 import both_on_two_ranks

    out["wan-both"] = both_on_two_ranks(rank, world)  # Wan2.2 A14B: both experts trained in one run
    return out


@pytest.mark.slow
def test_context_parallel_and_fsdp2_on_two_ranks_match_one_process() -> None:
    from tests.distributed import run_ranks

    for r in run_ranks(_families_on_two_ranks, 2):
        both = r.pop("wan-both")  # `model.experts.train: both` (test_wan22.py): FSDP2, with and without accumulation
        assert both["moved_high"] > 1e-4 and both["moved_low"] > 1e-4, both  # both experts trained
        assert both["fsdp"] < 1e-5 and both["fsdp_accum"] < 1e-5, both
        assert both["ddp_refused"] == 1.0, "DDP would see the idle expert's parameters as unused: refused"
        assert sorted(r) == sorted(CASES)
        for name, result in r.items():
            assert result["moved"] > 1e-4, f"{name}: training did not change the weights: the comparison is vacuous"
            layouts = {k: v for k, v in result.items() if k != "moved"}
            assert set(layouts) == {*CASES[name][3], "fsdp"}, name
            assert all(v < 1e-5 for v in layouts.values()), (name, result)
