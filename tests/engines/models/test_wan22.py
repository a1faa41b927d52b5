"""Wan2.2 in the `wan` family: the T2V-A14B pair of timestep experts (`model.experts`: the split, training one expert
or both, the two-expert export sampled with both, LoRA on the pair, FSDP2 parity of `train: both`, the recipes).

The released layouts are held by tests/engines/models/test_fact_tables.py (wan2.2-t2v-a14b_transformer.json, written
from the authors' modules through diffusers' conversion script by docs/fidelity/ref_wan22_facts.py) and the parameter
counts by test_variants.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flowspeed.configs import ModelConfig, load_config
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import keep_loaded, loaded
from flowspeed.engines.models.variants import get_variant
from flowspeed.engines.models.wan import (
    A14B_BOUNDARY,
    A14B_GUIDANCE_HIGH,
    A14B_GUIDANCE_LOW,
    A14B_SAMPLE_SHIFT,
    A14B_SAMPLE_STEPS,
    NUM_TRAIN_TIMESTEPS,
    WanExpertPair,
    expert_indices,
    high_noise_call,
    is_high_noise,
)
from flowspeed.engines.torch_engine.parallelize import block_lists
from PIL import Image
from torch import nn

from tests.conftest import REPO
from tests.engines.models.family_checks import mean_loss, train_steps

TEXT_LEN = 16
FAM = get_family("wan")


def pair_cfg(train: str, **model: Any) -> ModelConfig:
    """A tiny pair: the trained expert and the other one both random-init presets (different seeds)."""
    experts = {"train": train, "other": {"preset": "tiny"}, "boundary": A14B_BOUNDARY}
    return ModelConfig.model_validate({"family": "wan", "max_text_length": TEXT_LEN, "experts": experts, **model})


class _Probe(nn.Module):
    """pred = 0.3 x_t + 0.5 t / 1000, called as the family calls a Wan transformer; records every timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):  # noqa: ANN001, ANN201
        self.seen += timestep.float().flatten().tolist()
        return (0.3 * hidden_states + 0.5 * timestep.float().view(-1, 1, 1, 1, 1) / 1000,)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU the threads' contention costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """A cached batch's shape for the tiny preset: 2 samples of 3 latent frames of 4x4 (9 frames of 32x32)."""
    g = torch.Generator().manual_seed(5)
    return {"latent_params": torch.cat([torch.randn(2, 16, 3, 4, 4, generator=g), torch.zeros(2, 16, 3, 4, 4)], 1),
            "text_embeds": torch.randn(2, TEXT_LEN, 32, generator=g)}  # fmt: skip


def test_the_split_is_the_authors_boundary_and_diffsynths_index_range() -> None:
    scheduler = FAM.load_scheduler(pair_cfg("high_noise"))
    # DiffSynth-Studio's Wan2.2-T2V-A14B.sh: high noise --max_timestep_boundary 0.417, low noise --min 0.417 on the
    # 1000-point training grid ("boundary corresponds to timesteps [875, 1000]")
    assert scheduler.expert_indices == (0, 417)
    assert FAM.load_scheduler(pair_cfg("low_noise")).expert_indices == (417, NUM_TRAIN_TIMESTEPS)
    t = scheduler.timesteps
    assert t[416] >= 875 > t[417] and bool(is_high_noise(t[416], 0.875)) and not bool(is_high_noise(t[417], 0.875))
    assert expert_indices(scheduler, 0.9, "high_noise")[1] < 417 < expert_indices(scheduler, 0.5, "low_noise")[0]
    with pytest.raises(ValueError, match="no training timestep"):
        expert_indices(scheduler, 1e-6, "low_noise")
    assert not hasattr(FAM.load_scheduler(ModelConfig(family="wan")), "expert_indices")  # Wan2.1: the whole grid


@pytest.mark.parametrize("train", ["high_noise", "low_noise"])
def test_each_expert_trains_on_its_own_timesteps_only(train: str, batch: dict[str, torch.Tensor]) -> None:
    scheduler, probe = FAM.load_scheduler(pair_cfg(train)), _Probe()
    for seed in range(40):
        FAM.training_loss(probe, scheduler, batch, torch.Generator().manual_seed(seed))
    high = [t >= A14B_BOUNDARY * NUM_TRAIN_TIMESTEPS for t in probe.seen]
    assert len(high) == 80 and all(high) if train == "high_noise" else not any(high)
    assert len(set(probe.seen)) > 20  # drawn across the range, not one timestep


@pytest.fixture(scope="module")
def trained(batch: dict[str, torch.Tensor]) -> dict[str, tuple[list[float], list[torch.Tensor], float, float]]:
    """Each expert of a tiny pair trained 20 steps on its own timesteps: losses, weights, mean loss before/after."""
    out = {}
    for train in ("high_noise", "low_noise"):
        cfg = pair_cfg(train)
        scheduler, model = FAM.load_scheduler(cfg), FAM.load_transformer(cfg, 32, 16)
        before = mean_loss(FAM, model, scheduler, batch)
        losses, weights = train_steps(FAM, model.train(), scheduler, batch, steps=20, lr=3e-3, first_seed=100)
        out[train] = (losses, weights, before, mean_loss(FAM, model, scheduler, batch))
    return out


def test_training_either_expert_learns(trained: dict) -> None:
    for train, (_, _, before, after) in trained.items():
        assert after < 0.8 * before, (train, before, after)


@pytest.mark.parametrize("train", ["high_noise", "low_noise"])
def test_the_export_is_the_pair_with_the_other_expert_untouched(train: str, trained: dict, tmp_path: Path) -> None:
    cfg = pair_cfg(train)
    model = FAM.load_transformer(cfg, 32, 16)
    for p, w in zip(model.parameters(), trained[train][1], strict=True):
        p.data.copy_(w)
    FAM.save_pretrained(tmp_path / "final", cfg, model)
    index = json.loads((tmp_path / "final" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == A14B_BOUNDARY
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert json.loads((tmp_path / "final" / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == (
        A14B_SAMPLE_SHIFT)  # fmt: skip
    slot, other_slot = ("transformer", "transformer_2") if train == "high_noise" else ("transformer_2", "transformer")
    other = ModelConfig.model_validate({**cfg.model_dump(), "transformer": {"pretrained": str(tmp_path / "final"),
                                                                            "subfolder": other_slot}})  # fmt: skip
    # the other expert is its preset, bit for bit; the trained one is what training left
    fresh_other = FAM.load_other_expert(cfg, model).state_dict()
    saved_other = FAM.load_transformer(other.model_copy(update={"experts": None}), 0, 0).state_dict()
    assert all(torch.equal(v, saved_other[k]) for k, v in fresh_other.items())
    # read back as evaluation reads an export (model.transformer = final/transformer): the trained expert's own slot
    back = ModelConfig.model_validate({**cfg.model_dump(), "transformer": {"pretrained": str(tmp_path / "final"),
                                                                           "subfolder": "transformer"}})  # fmt: skip
    again = FAM.load_transformer(back, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), trained[train][1], strict=True))
    assert not torch.equal(next(iter(again.parameters())), next(iter(fresh_other.values())))
    assert slot in index


def test_generate_samples_with_both_experts_split_at_the_boundary(tmp_path: Path) -> None:
    cfg = pair_cfg("high_noise")
    FAM.save_pretrained(tmp_path / "final", cfg, FAM.load_transformer(cfg, 32, 16))
    kw = dict(num_frames=5, height=32, width=48, steps=6, guidance_scale=A14B_GUIDANCE_HIGH, seed=0)
    device = torch.device("cpu")
    with keep_loaded():  # the pipeline generate loads, with a hook on each expert recording its timesteps
        from diffusers import WanPipeline

        pipe = loaded(lambda: WanPipeline.from_pretrained(tmp_path / "final").to(device), tmp_path / "final", device)
        seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
        for name, calls in seen.items():
            getattr(pipe, name).register_forward_pre_hook(
                lambda _m, _a, k, calls=calls: calls.append(float(k["timestep"].flatten()[0])), with_kwargs=True
            )
        videos = FAM.generate(tmp_path / "final", ["a red circle", "a blue square"], device=device, **kw)
    assert videos.shape == (2, 5, 32, 48, 3) and videos.dtype == np.uint8
    assert seen["transformer"] and seen["transformer_2"], seen  # both experts sampled
    assert min(seen["transformer"]) >= A14B_BOUNDARY * 1000 > max(seen["transformer_2"])
    # the authors' (3.0 low noise, 4.0 high noise), as the pipeline applied them
    assert (pipe._guidance_scale, pipe._guidance_scale_2) == (A14B_GUIDANCE_HIGH, A14B_GUIDANCE_LOW)


def test_the_experts_block_is_checked() -> None:
    with pytest.raises(ValueError, match="applies to the families wan.*; 'ltx' has one denoiser"):
        ModelConfig.model_validate({"family": "ltx", "experts": {"train": "high_noise", "other": {}, "boundary": 0.9}})
    with pytest.raises(ValueError, match="less than 1"):
        ModelConfig.model_validate({"family": "wan", "experts": {"train": "high_noise", "other": {}, "boundary": 1.0}})
    with pytest.raises(ValueError, match="train"):
        ModelConfig.model_validate({"family": "wan", "experts": {"train": "all", "other": {}, "boundary": 0.9}})
    same = {"pretrained": "/models/Wan2.2-T2V-A14B-Diffusers", "subfolder": "transformer"}
    experts = {"train": "high_noise", "other": same, "boundary": 0.875}
    cfg = ModelConfig.model_validate({"family": "wan", "transformer": same, "experts": experts})
    with pytest.raises(ValueError, match="name the same weights"):
        FAM.load_transformer(cfg, 32, 16)


def test_released_pair_recipe_follows_the_authors() -> None:
    cfg = load_config(REPO / "configs" / "pipelines" / "published" / "wan2.2-t2v-a14b.yaml")
    m, p, e = cfg.model, cfg.train.parallel, cfg.model.experts
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer, e.other)), "a finetune names every weight"
    # Wan-Video/Wan2.2 wan/configs: wan_t2v_A14B.py boundary 0.875, 40 steps, guidance (3.0, 4.0); shared_config.py
    # 81 frames, 16 fps, 512 tokens; SUPPORTED_SIZES['t2v-A14B'] has 480*832
    assert e.boundary == A14B_BOUNDARY and e.train in ("high_noise", "low_noise")
    slots = {m.transformer.subfolder, e.other.subfolder}
    assert slots == {"transformer", "transformer_2"} and m.transformer.pretrained == e.other.pretrained
    assert (m.transformer.subfolder == "transformer") == (e.train == "high_noise")  # the release's slot of each
    assert m.max_text_length == 512 and cfg.data.num_frames == 81 and (cfg.data.height, cfg.data.width) == (480, 832)
    assert (cfg.eval.guidance_scale, cfg.eval.num_inference_steps, cfg.eval.fps, cfg.data.target_fps) == (
        A14B_GUIDANCE_HIGH, A14B_SAMPLE_STEPS, 16, 16)  # fmt: skip
    assert cfg.train.nproc_per_node == 8 and p.dp_shard * p.cp * p.tp * p.dp_replicate == 8
    variant = get_variant("wan", "wan2.2-t2v-a14b")
    heads = variant.components["transformer"].kwargs["num_attention_heads"]
    assert p.cp_mode != "ulysses" or heads % p.cp == 0
    assert variant.components["transformer"] == variant.components["transformer_2"]
    assert FAM.frame_count_error(cfg.data.num_frames) is None
    assert cfg.data.height % FAM.size_multiple == 0 and cfg.data.width % FAM.size_multiple == 0
    tiny = load_config(REPO / "configs" / "pipelines" / "wan-t2v-a14b.yaml")
    assert tiny.model.experts.boundary == A14B_BOUNDARY and tiny.model.experts.other.preset == "tiny"
    assert tiny.model.experts.train == "both"  # the tiny recipe trains the pair; one expert: the unit tests above
    assert (tiny.eval.guidance_scale, tiny.eval.num_inference_steps) == (A14B_GUIDANCE_HIGH, A14B_SAMPLE_STEPS)


# ---- train: both (the pair trained together in one run) ------------------------------------------------------------
def both_cfg() -> ModelConfig:
    return pair_cfg("both")


def test_both_shares_calls_out_evenly_by_the_experts_grid_shares() -> None:
    n_high = FAM.load_scheduler(both_cfg()).expert_ranges["high_noise"][1]
    assert n_high == 417  # the high-noise range [0, 417) of DiffSynth-Studio's 0.417
    highs = [k for k in range(1000) if high_noise_call(k, n_high)]
    assert len(highs) == 417  # exactly its share of every 1000 calls
    assert {b - a for a, b in zip(highs, highs[1:], strict=False)} == {2, 3}  # spread evenly, no runs
    assert sum(high_noise_call(k, n_high) for k in range(7)) == 7 * 417 // 1000  # the first calls too


def _recording(pair: WanExpertPair) -> dict[str, list[list[float]]]:
    """Per expert, the timesteps of each call it ran (a forward pre-hook on each)."""
    seen: dict[str, list[list[float]]] = {"high_noise": [], "low_noise": []}
    for name, calls in seen.items():
        pair.expert(name).register_forward_pre_hook(
            lambda _m, _a, k, calls=calls: calls.append(k["timestep"].float().tolist()), with_kwargs=True
        )
    return seen


def test_both_trains_one_expert_per_call_on_its_own_timesteps(batch: dict[str, torch.Tensor]) -> None:
    cfg = both_cfg()
    scheduler, pair = FAM.load_scheduler(cfg), FAM.load_transformer(cfg, 32, 16)
    assert isinstance(pair, WanExpertPair) and len(block_lists(pair)) == 2  # FSDP2/AC/compile find both experts
    seen, order = _recording(pair), []
    for call in range(6):
        before = {k: len(v) for k, v in seen.items()}
        FAM.training_loss(pair.train(), scheduler, batch, torch.Generator().manual_seed(call)).backward()
        ran = [k for k, v in seen.items() if len(v) > before[k]]
        assert len(ran) == 1, ran  # one expert per call, for the whole micro-batch
        order.append(ran[0])
        times = seen[ran[0]][-1]
        assert all((t >= 875) == (ran[0] == "high_noise") for t in times)  # its own timesteps
        idle = pair.expert("low_noise" if ran[0] == "high_noise" else "high_noise")
        assert all(p.grad is None for p in idle.parameters())  # no gradient: AdamW leaves it as it is
        pair.zero_grad(set_to_none=True)
    assert order == ["high_noise" if high_noise_call(k, 417) else "low_noise" for k in range(6)]
    assert set(order) == {"high_noise", "low_noise"} and int(pair.calls) == 6
    # the count is in the state dict (a checkpoint): a resumed pair continues the same sequence
    again = FAM.load_transformer(cfg, 32, 16)
    again.load_state_dict(pair.state_dict())
    assert again.next_expert(417) == ("high_noise" if high_noise_call(6, 417) else "low_noise")
    assert int(again.calls) == 7


def test_both_evaluates_each_sample_on_its_own_expert(batch: dict[str, torch.Tensor]) -> None:
    """Eval mode (held-out loss): indices over the whole grid, each sample scored on its expert's prediction."""
    cfg = both_cfg()
    scheduler, pair = FAM.load_scheduler(cfg), FAM.load_transformer(cfg, 32, 16).eval()
    x0, text = batch["latent_params"][:, :16], batch["text_embeds"]
    for seed in range(50):  # a draw with one sample on each side of the boundary
        g = torch.Generator().manual_seed(seed)
        noise, idx = torch.randn(x0.shape, generator=g), torch.randint(0, NUM_TRAIN_TIMESTEPS, (2,), generator=g)
        if (idx < 417).sum() == 1:
            break
    with torch.no_grad():
        loss = FAM.training_loss(pair, scheduler, batch, torch.Generator().manual_seed(seed))
        per_sample = [FAM.flow_loss(pair.expert("high_noise" if idx[b] < 417 else "low_noise"), scheduler,
                                    x0[b : b + 1], noise[b : b + 1], idx[b : b + 1], text[b : b + 1])
                      for b in range(2)]  # fmt: skip
    torch.testing.assert_close(loss, torch.stack(per_sample).mean())
    assert int(pair.calls) == 0  # evaluation does not advance the training schedule


def test_model_flops_count_the_one_expert_a_step_runs() -> None:
    """MFU's model FLOPs: a `both` step runs one expert, so the trainer counts one expert's parameters (half the
    pair's); any other model counts all of its own."""
    from flowspeed.engines.torch_engine.trainer import _active_parameters

    pair, single = FAM.load_transformer(both_cfg(), 32, 16), FAM.load_transformer(pair_cfg("high_noise"), 32, 16)
    total = sum(p.numel() for p in pair.parameters())
    assert _active_parameters(pair, pair) == total // 2 == sum(p.numel() for p in single.parameters())
    assert _active_parameters(single, single) == total // 2


def test_both_learns_and_exports_both_trained_experts(batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    cfg = both_cfg()
    scheduler, pair = FAM.load_scheduler(cfg), FAM.load_transformer(cfg, 32, 16)
    fresh = {k: v.clone() for k, v in pair.state_dict().items()}
    before = mean_loss(FAM, pair, scheduler, batch)
    train_steps(FAM, pair.train(), scheduler, batch, steps=20, lr=3e-3, first_seed=100)
    assert mean_loss(FAM, pair, scheduler, batch) < 0.8 * before
    for slot in ("transformer.", "transformer_2."):  # both experts trained
        assert max((v - fresh[k]).abs().max().item() for k, v in pair.state_dict().items() if k.startswith(slot)) > 1e-3
    FAM.save_pretrained(tmp_path / "final", cfg, pair)
    index = json.loads((tmp_path / "final" / "model_index.json").read_text())
    assert index["boundary_ratio"] == A14B_BOUNDARY and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    # read back as evaluation (and a champion's init_from) reads an export: model.transformer = final/transformer
    back = ModelConfig.model_validate({**cfg.model_dump(), "transformer": {"pretrained": str(tmp_path / "final"),
                                                                           "subfolder": "transformer"}})  # fmt: skip
    again = FAM.load_transformer(back, 0, 0)
    assert isinstance(again, WanExpertPair)
    trained = pair.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items() if k != "calls")
    with pytest.raises(ValueError, match="only a run training one expert"):
        FAM.load_other_expert(cfg, pair)


def test_both_lora_exports_one_peft_adapter_and_diffusers_files_per_expert(tmp_path: Path) -> None:
    """The engine's export path (engines/export.py) on a LoRA pair: peft's adapter covers both experts and loads
    back onto the pair; diffusers' per-expert files load into a WanPipeline's two slots; the merged export equals
    the adapted pair."""
    from diffusers import WanPipeline
    from flowspeed.engines.export import export_weights, plain_model
    from flowspeed.engines.torch_engine.lora import load_adapter

    cfg = load_config(REPO / "configs" / "pipelines" / "wan-t2v-a14b.yaml",
                      ["train.lora.enabled=true", "train.lora.rank=4", f"model.max_text_length={TEXT_LEN}"],
                      workdir=tmp_path)  # fmt: skip
    args = {"text_embed_dim": 32, "latent_channels": 16}
    model = plain_model(FAM, cfg, args)
    assert isinstance(model, WanExpertPair)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 2, 4, 4, generator=g), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, TEXT_LEN, 32, generator=g)}  # fmt: skip
    with torch.no_grad():
        want = {e: model(expert=e, **inputs)[0] for e in ("high_noise", "low_noise")}
    export_weights(FAM, cfg, args, model.state_dict(), tmp_path / "final")
    lora = tmp_path / "final" / "lora"
    peft_again = load_adapter(plain_model(FAM, cfg, args), lora, WanPipeline, "transformer")
    FAM.save_pretrained(tmp_path / "base", cfg.model, FAM.load_transformer(cfg.model, **args))
    pipe = WanPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(lora)
    pipe.load_lora_weights(lora / "transformer_2", load_into_transformer_2=True)
    merged = WanPipeline.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        for expert, slot in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
            assert torch.equal(peft_again(expert=expert, **inputs)[0], want[expert])
            torch.testing.assert_close(getattr(pipe, slot)(**inputs, return_dict=False)[0], want[expert])
            torch.testing.assert_close(getattr(merged, slot)(**inputs, return_dict=False)[0], want[expert],
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
        assert not torch.allclose(want["high_noise"], pipe.transformer_2(**inputs, return_dict=False)[0])


def both_on_two_ranks(rank: int, world: int) -> dict[str, float]:
    """(Run by tests/engines/models/test_video_family_parity.py, in the video families' one 2-rank spawn.)
    `train: both` under FSDP2 (both experts' blocks and the root sharded) against one process: 3 steps of one
    micro-batch (low, low, high), and 2 steps of 2 accumulated micro-batches (the first without gradient sync;
    step 2 runs the high-noise expert only in its unsynchronised micro-batch). Also: DDP is refused."""
    from flowspeed.engines.torch_engine.parallelize import block_lists
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from tests.engines.models.family_checks import max_difference, moved, train_steps

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    cfg = both_cfg()
    scheduler = FAM.load_scheduler(cfg)
    g = torch.Generator().manual_seed(3)
    data = {"latent_params": torch.randn(2, 32, 2, 8, 8, generator=g),
            "text_embeds": torch.randn(2, TEXT_LEN, 32, generator=g)}  # fmt: skip

    def sharded() -> nn.Module:
        model = FAM.load_transformer(cfg, 32, 16)
        for blocks in block_lists(model):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def accumulated(model: nn.Module) -> tuple[list[float], list[torch.Tensor]]:
        opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-3), []
        for step in range(2):
            for micro in range(2):
                if hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(micro == 1)
                loss = FAM.training_loss(model, scheduler, data, torch.Generator().manual_seed(10 * step + micro))
                (loss / 2).backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses, [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]

    ref = train_steps(FAM, FAM.load_transformer(cfg, 32, 16), scheduler, data)
    fresh = FAM.load_transformer(cfg, 32, 16)
    n_high = sum(1 for n, _ in fresh.named_parameters() if n.startswith("transformer."))
    out = {
        "moved_high": moved(ref[1][:n_high], fresh.transformer),
        "moved_low": moved(ref[1][n_high:], fresh.transformer_2),
    }
    out["fsdp"] = max_difference(train_steps(FAM, sharded(), scheduler, data), ref)
    out["fsdp_accum"] = max_difference(accumulated(sharded()), accumulated(FAM.load_transformer(cfg, 32, 16)))
    try:
        FAM.training_loss(DistributedDataParallel(fresh), scheduler, data, torch.Generator().manual_seed(0))
        out["ddp_refused"] = 0.0
    except ValueError as exc:
        out["ddp_refused"] = float("FSDP2" in str(exc))
    return out


# ---- TI2V-5B: Wan2.2's VAE and first-frame conditioning ------------------------------------------------------------
TI2V = ModelConfig.model_validate({"family": "wan", "max_text_length": TEXT_LEN, "vae": {"preset": "tiny-2.2"}})


@pytest.fixture(scope="module")
def ti2v_batch() -> dict[str, torch.Tensor]:
    """What prep caches for two 9-frame 64x64 demo clips with the tiny Wan2.2 VAE (16x: 4x4 latents, 48 channels)."""
    from flowspeed.datasets_prep.demo import render_clip

    clips = np.stack([render_clip("circle", "red", "black", "from left to right", 64, 64, 9),
                      render_clip("square", "blue", "grey", "from top to bottom", 64, 64, 9)])  # fmt: skip
    tok, enc = FAM.load_text_encoder(TI2V)
    with torch.no_grad():
        params = FAM.encode_video(FAM.load_vae(TI2V), torch.from_numpy(clips))
        text = FAM.encode_text(tok, enc, ["a red circle moving right", "a blue square moving down"], TEXT_LEN)
    return {"latent_params": params, "text_embeds": text, "clips": torch.from_numpy(clips)}


def test_the_wan22_vae_is_16x_with_48_normalised_channels_and_32_px_sides(ti2v_batch: dict) -> None:
    from flowspeed.engines.models.wan import latent_stats

    vae = FAM.load_vae(TI2V)
    c = vae.config
    # diffusers' convert_wan_to_diffusers.py vae22_diffusers_config (the authors' Wan2_2_VAE mean/std, ends shown)
    assert (c.z_dim, c.is_residual, c.patch_size, c.scale_factor_spatial, c.in_channels) == (48, True, 2, 16, 12)
    assert (c.latents_mean[0], c.latents_mean[-1], c.latents_std[0], c.latents_std[-1]) == (
        -0.2289, -0.0667, 0.4765, 0.7744)  # fmt: skip
    assert ti2v_batch["latent_params"].shape == (2, 96, 3, 4, 4)  # 9 frames -> 3, 64 px -> 4
    x = ti2v_batch["clips"].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
        first = vae.encode(x[:, :, :1]).latent_dist.mean  # the first frame alone, as an image-to-video call encodes
    mean, std = latent_stats(vae, mu)
    torch.testing.assert_close(ti2v_batch["latent_params"][:, :48], (mu - mean) / std)
    torch.testing.assert_close(first, mu[:, :, :1])  # causal: a clip's first latent frame is its first frame's
    assert (FAM.size_multiple_for(TI2V), FAM.size_multiple_for(ModelConfig(family="wan"))) == (32, 16)
    with pytest.raises(ValueError, match="multiples of 32, not 48x48"):
        FAM.encode_video(vae, torch.zeros(1, 5, 48, 48, 3, dtype=torch.uint8))
    assert FAM.encode_video(
        FAM.load_vae(ModelConfig(family="wan")), torch.zeros(1, 5, 48, 48, 3, dtype=torch.uint8)
    ).shape == (1, 32, 2, 6, 6)  # fmt: skip  (Wan2.1's VAE: 16 px)


class _FrameProbe(nn.Module):
    """pred = 0.3 x_t + 0.5 t / 1000 per token (t: (B, S) here), plus `poison` on the first latent frame; records
    its inputs."""

    def __init__(self, poison: float = 0.0) -> None:
        super().__init__()
        self.poison, self.inputs = poison, []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):  # noqa: ANN001, ANN201
        self.inputs.append((hidden_states.clone(), timestep.clone()))
        b, _, t, h, w = hidden_states.shape
        per_token = timestep.float().view(b, 1, t, h // 2, w // 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
        out = 0.3 * hidden_states + 0.5 * per_token / 1000
        out[:, :, 0] += self.poison
        return (out,)


def test_ti2v_training_conditions_on_the_clean_first_frame(ti2v_batch: dict) -> None:
    scheduler = FAM.load_scheduler(TI2V)
    assert scheduler.first_frame and not FAM.load_scheduler(ModelConfig(family="wan")).first_frame
    data = {k: ti2v_batch[k] for k in ("latent_params", "text_embeds")}
    clean, poisoned = _FrameProbe(), _FrameProbe(poison=100.0)
    loss = FAM.training_loss(clean, scheduler, data, torch.Generator().manual_seed(3))
    assert loss.item() == FAM.training_loss(poisoned, scheduler, data, torch.Generator().manual_seed(3)).item()
    (noisy, timestep), x0 = clean.inputs[0], data["latent_params"][:, :48]
    assert torch.equal(noisy[:, :, 0], x0[:, :, 0]) and not torch.allclose(noisy[:, :, 1:], x0[:, :, 1:])
    assert timestep.shape == (2, 3 * 2 * 2)  # (B, T' x H'/2 x W'/2): per token, diffusers' expand_timesteps
    assert (timestep[:, :4] == 0).all() and (timestep[:, 4:] == timestep[:, 4:5]).all() and (timestep[:, 4:] > 0).all()
    # the loss by hand: frames 1.. only, DiffSynth-Studio's bsmntw weight at the drawn timestep
    from flowspeed.engines.models.wan import bsmntw_weights

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    idx = torch.randint(0, NUM_TRAIN_TIMESTEPS, (2,), generator=g)
    sigma = scheduler.sigmas[idx].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy[:, :, 1:], ((1 - sigma) * x0 + sigma * noise)[:, :, 1:])
    pred = 0.3 * noisy + 0.5 * scheduler.timesteps[idx].view(-1, 1, 1, 1, 1) / 1000
    per_sample = ((pred - (noise - x0))[:, :, 1:] ** 2).flatten(1).mean(1)
    weights = bsmntw_weights(scheduler.timesteps[:NUM_TRAIN_TIMESTEPS])[idx]
    torch.testing.assert_close(loss, (weights * per_sample).mean())
    with pytest.raises(ValueError, match="is Wan2.2 A14B's expert pair, on the Wan2.1 VAE"):
        FAM.load_transformer(pair_cfg("high_noise", vae={"preset": "tiny-2.2"}), 32, 48)


def test_ti2v_loss_falls_and_the_export_samples_text_and_image_to_video(ti2v_batch: dict, tmp_path: Path) -> None:
    data = {k: ti2v_batch[k] for k in ("latent_params", "text_embeds")}
    scheduler, model = FAM.load_scheduler(TI2V), FAM.load_transformer(TI2V, 32, 48)
    before = mean_loss(FAM, model, scheduler, data)
    train_steps(FAM, model.train(), scheduler, data, steps=20, lr=3e-3, first_seed=100)
    assert mean_loss(FAM, model, scheduler, data) < 0.8 * before

    FAM.save_pretrained(tmp_path / "final", TI2V, model)
    index = json.loads((tmp_path / "final" / "model_index.json").read_text())
    assert index["expand_timesteps"] is True and index["boundary_ratio"] is None  # Wan2.2-TI2V-5B-Diffusers' layout
    device, image = torch.device("cpu"), ti2v_batch["clips"][0, 0].numpy()
    kw = dict(num_frames=5, height=64, width=96, steps=2, guidance_scale=5.0, seed=0, device=device)
    assert FAM.generate(tmp_path / "final", ["a red circle"], **kw).shape == (1, 5, 64, 96, 3)
    with pytest.raises(ValueError, match="multiples of 32, not 48x96"):
        FAM.generate(tmp_path / "final", ["a"], **{**kw, "height": 48})
    with keep_loaded():  # the image path: its pipeline, with a hook on the transformer recording its inputs
        from diffusers import WanImageToVideoPipeline, WanPipeline

        folder = tmp_path / "final"
        pipe = loaded(lambda: WanImageToVideoPipeline.from_pipe(WanPipeline.from_pretrained(folder)).to(device),
                      folder, device, "image-to-video")  # fmt: skip
        seen = []
        pipe.transformer.register_forward_pre_hook(
            lambda _m, _a, k: seen.append((k["hidden_states"].clone(), k["timestep"].clone())), with_kwargs=True
        )
        videos = FAM.generate(folder, ["a red circle"], images=[image], **kw)
    assert videos.shape == (1, 5, 64, 96, 3) and videos.dtype == np.uint8
    vae = FAM.load_vae(TI2V)
    from flowspeed.engines.models.wan import latent_stats

    resized = np.asarray(Image.fromarray(image).resize((96, 64), Image.LANCZOS))
    with torch.no_grad():
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mode()
    mean, std = latent_stats(vae, z)
    for hidden, timestep in seen:  # every step: the image's latent as the first frame, its tokens at timestep 0
        torch.testing.assert_close(hidden[:, :, :1], (z - mean) / std, atol=1e-5, rtol=0)
        assert (timestep[:, : 2 * 3] == 0).all() and (timestep[:, 2 * 3 :] > 0).all()


def test_ti2v_recipes_use_the_wan22_vae_and_its_32_px_sides() -> None:
    tiny = load_config(REPO / "configs" / "pipelines" / "wan-ti2v.yaml")
    assert tiny.model.vae.preset == "tiny-2.2" and FAM.first_frame_conditioned(tiny.model)
    multiple = FAM.size_multiple_for(tiny.model)
    assert multiple == 32 and tiny.data.height % multiple == 0 and tiny.data.width % multiple == 0
    # the released TI2V-5B: Wan2.2's VAE (residual: first-frame conditioned), 704x1280 (wan_ti2v_5B.py)
    published = load_config(REPO / "configs" / "pipelines" / "published" / "wan2.2-ti2v-5b.yaml")
    vae = get_variant("wan", "wan2.2-ti2v-5b").components["vae"].kwargs
    assert vae["is_residual"] and vae["scale_factor_spatial"] * 2 == multiple
    assert published.data.height % multiple == 0 and published.data.width % multiple == 0
    assert published.model.experts is None
