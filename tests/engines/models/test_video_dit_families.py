"""The video-DiT families flowspeed defines (opensora, opensora1.2, opensoraplan, opensoraplan_i2v, qihoo_t2x),
through the same family interface prep, the engine and eval use: cached latents -> the authors' objective ->
export -> sampling; the authors' checkpoint layout through `pretrained:`; FSDP2 on 2 real ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.dits import causalvae, opensoraplan, pt_dit, stdit, stdit3, wfvae
from safetensors.torch import save_file

from tests.distributed import run_ranks

FAMILIES = ["opensora", "opensora1.2", "opensoraplan", "opensoraplan_i2v", "qihoo_t2x"]
TEXT = 8  # caption tokens of the tiny runs


def _cfg(family: str, **parts: ComponentConfig) -> ModelConfig:
    return ModelConfig(family=family, max_text_length=TEXT, **parts)


def _frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Moving bars: a clip with structure, so the tiny models have something to fit."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 255, (b, 1, 1, 1, 3), generator=g).float()
    x = torch.arange(w).float()[None, None, None, :, None]
    frames = [(base + 100 * torch.sin((x + 3 * i) / 4)).clamp(0, 255) for i in range(t)]
    return torch.cat(frames, dim=1).expand(b, t, h, w, 3).to(torch.uint8).contiguous()


def _batch(family: str, t: int = 5, size: int = 64) -> tuple[dict[str, torch.Tensor], dict]:
    """What prep caches and the engine batches for two clips: latent posterior, text states + mask, VAE factors."""
    fam, cfg = get_family(family), _cfg(family)
    vae = fam.load_vae(cfg)
    tokenizer, encoder = fam.load_text_encoder(cfg)
    with torch.no_grad():
        latents = fam.encode_video(vae, _frames(2, t, size, size))
        text = fam.encode_text(tokenizer, encoder, ["red bars", "blue bars"], TEXT)
    scaling = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    batch = {"latent_params": latents, **text, "scaling_factor": torch.full((2,), scaling),
             "shift_factor": torch.zeros(2)}  # fmt: skip
    record = {"latent_shape": list(latents.shape[1:]), "text_shape": list(text["text_embeds"].shape[1:])}
    return batch, record


def _eval_loss(fam, model, scheduler, batch) -> float:  # noqa: ANN001
    with torch.no_grad():
        return sum(fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(100 + s)).item()
                   for s in range(6)) / 6  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_learns(family: str) -> None:
    fam, cfg = get_family(family), _cfg(family)
    batch, record = _batch(family)
    model = fam.load_transformer(cfg, **fam.model_args(record))
    scheduler = fam.load_scheduler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = _eval_loss(fam, model, scheduler, batch)
    # Qihoo-T2X's resolution shift (the authors': sqrt(H*W / 512^2)) is ~0.18 on these 64-pixel clips, so most draws
    # sit near t = 0, where there is little to learn per step: it gets 40 steps (17% in 20, 21% in 40, measured).
    steps = 40 if family == "qihoo_t2x" else 20
    for step in range(steps):
        loss = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(fam, model, scheduler, batch)
    assert after < 0.8 * before, f"{family}: held-out-noise loss {before:.4f} -> {after:.4f} after {steps} steps"


# (frames, height, width) per family: non-square where the model allows it; PT-DiT's windows need 64-pixel sides
SHAPES = {"opensora": (3, 32, 48), "opensora1.2": (9, 32, 48), "opensoraplan": (9, 32, 48),
          "opensoraplan_i2v": (5, 32, 48), "qihoo_t2x": (5, 64, 128)}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_generate_the_requested_shape(family: str, tmp_path: Path) -> None:
    fam, cfg = get_family(family), _cfg(family)
    _, record = _batch(family, t=5, size=64)
    model = fam.load_transformer(cfg, **fam.model_args(record))
    if hasattr(model, "pos_embed_mask"):  # the condition branches start at zero (as the authors'): as if trained
        torch.nn.init.normal_(model.pos_embed_masked_hidden_states[1].weight)
    fam.save_pretrained(tmp_path, cfg, model)
    assert all(p.is_file() for p in fam.export_files(tmp_path))
    t, h, w = SHAPES[family]
    kwargs = dict(num_frames=t, height=h, width=w, steps=2, guidance_scale=4.0, seed=0, device=torch.device("cpu"))
    if fam.conditioning == "image":
        red, blue = (np.zeros((40, 50, 3), np.uint8) for _ in range(2))
        red[..., 0], blue[..., 2] = 255, 255
        a = fam.generate(tmp_path, ["bars"], images=[red], **kwargs)
        b = fam.generate(tmp_path, ["bars"], images=[blue], **kwargs)
        assert not np.array_equal(a, b), "the conditioning image does not reach the video"
        with pytest.raises(ValueError, match="one image per prompt"):
            fam.generate(tmp_path, ["a", "b"], images=[red], **kwargs)
    else:
        a = fam.generate(tmp_path, ["bars"], **kwargs)
        with pytest.raises(ValueError, match="takes no images"):
            fam.generate(tmp_path, ["bars"], images=[np.zeros((8, 8, 3), np.uint8)], **kwargs)
    assert a.shape == (1, t, h, w, 3) and a.dtype == np.uint8
    # our export reloads as its own class through `pretrained:` + subfolder (no preset needed)
    again = fam.load_transformer(
        _cfg(family, transformer=ComponentConfig(preset=None, pretrained=str(tmp_path), subfolder="transformer")),
        **fam.model_args(record),
    )
    assert type(again) is type(model)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


# The tiny preset of each family as the authors would save it: (module, preset name, latent channels in the input)
PUBLISHED_TINY = {
    "opensora": (stdit, "tiny", stdit.STDiT, 4),
    "opensora1.2": (stdit3, "tiny", stdit3.STDiT3, 4),
    "opensoraplan": (opensoraplan, "tiny", opensoraplan.OpenSoraT2V_v1_3, 4),
    "opensoraplan_i2v": (opensoraplan, "tiny-i2v", opensoraplan.OpenSoraInpaint_v1_3, 12),
    "qihoo_t2x": (pt_dit, "tiny", pt_dit.PTDiT, 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_authors_checkpoint_layout_loads_clean_with_identical_outputs(family: str, tmp_path: Path) -> None:
    module, preset, cls, in_channels = PUBLISHED_TINY[family]
    fam, caption = get_family(family), 24
    torch.manual_seed(7)  # a tiny run of theirs: the preset sized to its data, as ours is
    theirs = cls(**{**module.PRESETS[preset], **fam.tiny_overrides(_cfg(family), caption, 4)}).eval()
    if hasattr(theirs, "pos_embed_mask"):  # zero-initialised branches: give them weights so they are checked too
        torch.nn.init.normal_(theirs.pos_embed_mask[1].weight)
        torch.nn.init.normal_(theirs.pos_embed_masked_hidden_states[1].weight)
    released = module.to_published(theirs.state_dict())
    path = tmp_path / "released.pth"
    torch.save({"model": released, "ema_state_dict": {}, "step": 1000}, path)  # a training checkpoint's nesting
    cfg = _cfg(family, transformer=ComponentConfig(preset="tiny", pretrained=str(path)))
    ours = fam.load_transformer(cfg, caption, theirs.config.in_channels).eval()
    x = torch.randn(2, in_channels, 2, 8, 8)
    inputs = dict(timestep=torch.tensor([10.0, 700.0]), encoder_hidden_states=torch.randn(2, TEXT, caption),
                  encoder_attention_mask=torch.tensor([[1.0] * TEXT, [1.0] * 3 + [0.0] * (TEXT - 3)]))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(ours(x, **inputs), theirs(x, **inputs))
    # a checkpoint of another variant is refused by shape, naming the keys
    wrong = {
        k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim and "proj" in k else v for k, v in released.items()
    }
    save_file({k: v.contiguous() for k, v in wrong.items()}, tmp_path / "wrong.safetensors")
    bad = _cfg(family, transformer=ComponentConfig(preset="tiny", pretrained=str(tmp_path / "wrong.safetensors")))
    with pytest.raises(ValueError, match="wrong shape for this config"):
        fam.load_transformer(bad, caption, theirs.config.in_channels)
    # a released variant's text width and caption length are its own: a cache that differs is refused by name
    with pytest.raises(ValueError, match=f"takes {caption}-d text states but the cache holds {caption + 1}-d"):
        fam.check_transformer(ours, cfg, caption + 1)
    if fam.null_caption(ours) is not None:  # OpenSora's null caption fixes the caption length
        with pytest.raises(ValueError, match=f"set model.max_text_length: {TEXT}"):
            fam.check_transformer(ours, cfg.model_copy(update={"max_text_length": 300}), caption)


@pytest.mark.parametrize(
    ("family", "module", "cls"),
    [("opensoraplan", wfvae, wfvae.WFVAEModel), ("qihoo_t2x", causalvae, causalvae.CausalVAEModel)],
)
def test_released_vae_checkpoints_load_through_the_family(family: str, module, cls, tmp_path: Path) -> None:  # noqa: ANN001
    torch.manual_seed(3)
    theirs = cls(**module.PRESETS["tiny"]).eval()
    torch.save({"gen_model": module.to_published(theirs.state_dict())}, tmp_path / "vae.ckpt")  # their VAE trainer
    vae = get_family(family).load_vae(
        _cfg(family, vae=ComponentConfig(preset="tiny", pretrained=str(tmp_path / "vae.ckpt")))
    )
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x), theirs.encode(x))


def test_clear_errors() -> None:
    fam = get_family("opensoraplan_i2v")
    with pytest.raises(ValueError, match="not a variant of this family; known: tiny, OpenSoraInpaint"):
        fam.load_transformer(_cfg("opensoraplan_i2v", transformer=ComponentConfig(preset="tiny-v1.2")), 32, 4)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        get_family("opensoraplan").generate(Path("."), ["x"], num_frames=8, height=32, width=32, steps=1,
                                            guidance_scale=1.0, seed=0, device=torch.device("cpu"))  # fmt: skip


def _fsdp_matches_one_process(rank: int, world: int) -> dict[str, tuple[float, float]]:
    """Each family's tiny denoiser: one training step's loss and gradients under FSDP2 (2 shards, every rank the
    same batch, so the mean-reduced gradient is the single process's) vs the same model unsharded."""
    from flowspeed.engines.torch_engine.parallelize import apply_fsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    out = {}
    for family in FAMILIES:
        fam, cfg = get_family(family), _cfg(family)
        batch, record = _batch(family)
        scheduler = fam.load_scheduler(cfg)
        ref = fam.load_transformer(cfg, **fam.model_args(record))
        sharded = fam.load_transformer(cfg, **fam.model_args(record))
        apply_fsdp(sharded, mesh, "float32", "float32", reshard=True)
        losses = []
        for model in (ref, sharded):
            loss = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(5))
            loss.backward()
            losses.append(loss.item())
        grad_diff = max(
            (b.grad.full_tensor() if isinstance(b.grad, DTensor) else b.grad).sub(a.grad).abs().max().item()
            for a, b in zip(ref.parameters(), sharded.parameters(), strict=True)
            if a.grad is not None
        )
        out[family] = (abs(losses[0] - losses[1]), grad_diff)
    return out


@pytest.mark.slow
def test_fsdp2_on_two_ranks_matches_one_process() -> None:
    for rank_out in run_ranks(_fsdp_matches_one_process, 2):
        for family, (loss_diff, grad_diff) in rank_out.items():
            assert loss_diff < 1e-6 and grad_diff < 1e-5, (family, loss_diff, grad_diff)
