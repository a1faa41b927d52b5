"""Reference training losses of the image families, assembled as their authors' training code assembles them.

Sources (run here with the project venv's diffusers 0.42.1; nothing of ours is imported but the seeded inputs and
weights of tests/engines/models/test_image_objectives.py and tests/fidelity.py, which are defined by name and seed):
- SD3: huggingface/diffusers@58eb52c examples/dreambooth/train_dreambooth_sd3.py defaults (weighting_scheme
  logit_normal 0/1, precondition_outputs 1; the released scheduler: FlowMatchEulerDiscreteScheduler shift 3.0);
  `get_sigmas` looks the sigma up by timestep value, as the script does.
- FLUX.1: examples/dreambooth/train_dreambooth_flux.py defaults (weighting_scheme none, guidance 3.5 when the model has
  guidance_embeds; timesteps / 1000; prediction unpacked with `_unpack_latents` before the MSE). Scheduler: dev's
  released config (shift 3.0 with use_dynamic_shifting: the training grid is unshifted) or schnell's (shift 1.0).
- SDXL: examples/text_to_image/train_text_to_image_sdxl.py defaults (uniform integer t, DDPM add_noise, epsilon
  target, F.mse_loss mean, add_time_ids = original size + crop (0, 0) + target size; noise_offset 0, no SNR weighting).
- Kolors: Kwai-Kolors/Kolors@0fafa56 dreambooth/train_dreambooth_lora.py (DDPMScheduler of the release: 1100 steps,
  scaled-linear 0.00085..0.014, epsilon; add_time_ids as above; F.mse_loss mean; noise_offset 0).
- Hunyuan-DiT: Tencent-Hunyuan/HunyuanDiT@d2cb9cd hydit/diffusion (their code, imported from a checkout at
  /tmp/img17/hunyuan): create_diffusion(noise_schedule scaled_linear, predict_type v_prediction, learn_sigma True,
  beta_end 0.03 (v1.1, train_v1.1.sh) or 0.018 (v1.2, train.sh)), `training_losses(...)["loss"].mean()`. Their
  `th.randint` / `th.randn_like` draws are replaced by the draws listed below (hydit.utils.tools.assert_shape is
  stubbed: that module imports their whole training stack); the model is diffusers' HunyuanDiT2DModel, returning
  dict(x=...) as their model does, conditioned as diffusers' pipeline conditions it.
Draws (one CPU generator per case, in this order): the posterior sample eps of the cached VAE parameters, the noise,
then the timestep draw (SD3: normal(0, 1) of size B; FLUX: uniform of size B; DDPM families: randint(0, T, (B,))).

Run: PYTHONPATH=/tmp/img17/hunyuan:. .venv/bin/python docs/fidelity/ref_image_losses.py
Prints `REFERENCE = {...}` for tests/engines/models/test_image_objectives.py.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.engines.models.test_image_objectives import SEEDS, SIZES, image_batch  # noqa: E402
from tests.fidelity import seeded_weights  # noqa: E402

_tools = types.ModuleType("hydit.utils.tools")
_tools.assert_shape = lambda *args: None
sys.modules["hydit.utils.tools"] = _tools
from hydit.diffusion import create_diffusion  # noqa: E402

_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
             norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
             cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 8)  # fmt: skip
_FLUX = dict(in_channels=16, joint_attention_dim=64, pooled_projection_dim=32, num_layers=1, num_single_layers=1,
             attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))  # fmt: skip
DENOISERS = {
    ("sd3", "tiny"): lambda: SD3Transformer2DModel(
        in_channels=4, out_channels=4, joint_attention_dim=64, pooled_projection_dim=64, sample_size=8, patch_size=2,
        num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, pos_embed_max_size=32),
    ("flux", "tiny"): lambda: FluxTransformer2DModel(**_FLUX, guidance_embeds=False),
    ("flux", "tiny-dev"): lambda: FluxTransformer2DModel(**_FLUX, guidance_embeds=True),
    ("sdxl", "tiny"): lambda: UNet2DConditionModel(**_UNET),
    ("kolors", "tiny"): lambda: UNet2DConditionModel(**_UNET, encoder_hid_dim=32, encoder_hid_dim_type="text_proj"),
    ("hunyuandit", "tiny"): lambda: HunyuanDiT2DModel(
        in_channels=4, cross_attention_dim=32, learn_sigma=True, cross_attention_dim_t5=64, text_len=77,
        text_len_t5=256, num_layers=4, num_attention_heads=2, attention_head_dim=16, hidden_size=32, patch_size=2,
        sample_size=8, mlp_ratio=2.0, pooled_projection_dim=32, use_style_cond_and_image_meta_size=True),
}  # fmt: skip
SCHEDULERS = {
    "sd3": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    "flux/tiny": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    "flux/tiny-dev": lambda: FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096),
    "sdxl": lambda: DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon"),
    "kolors": lambda: DDPMScheduler(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
                                    beta_schedule="scaled_linear", prediction_type="epsilon"),
}  # fmt: skip


def denoiser(key: tuple[str, str]) -> torch.nn.Module:
    model = DENOISERS[key]()
    model.load_state_dict(seeded_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}), strict=True)
    return model.eval()


def draws(batch: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input as `vae.encode(x).latent_dist.sample()`, (z - shift) * scale, and the noise."""
    params = batch["latent_params"]
    eps = torch.randn(params[:, : params.shape[1] // 2].shape, generator=g)
    dist = DiagonalGaussianDistribution(params.float())
    view = (-1, 1, 1, 1)
    x0 = (dist.mean + dist.std * eps - batch["shift_factor"].view(view)) * batch["scaling_factor"].view(view)
    return x0, torch.randn(x0.shape, generator=g)


def sd3_loss(model, sched, batch, g) -> float:
    x0, noise = draws(batch, g)
    u = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], logit_mean=0.0, logit_std=1.0, generator=g)
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    idx = [(sched.timesteps == t).nonzero().item() for t in timesteps]  # the script's get_sigmas
    sigmas = sched.sigmas[idx].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["text_embeds"],
                 pooled_projections=batch["pooled_embeds"], return_dict=False)[0]  # fmt: skip
    pred = pred * (-sigmas) + noisy  # precondition_outputs=1
    weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
    return torch.mean((weighting * (pred - x0) ** 2).reshape(x0.shape[0], -1), 1).mean().item()


def flux_loss(model, sched, batch, g) -> float:
    x0, noise = draws(batch, g)
    b, c, h, w = x0.shape
    u = compute_density_for_timestep_sampling("none", b, generator=g)
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    idx = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[idx].view(-1, 1, 1, 1)
    noisy = FluxPipeline._pack_latents((1.0 - sigmas) * x0 + sigmas * noise, b, c, h, w)
    guidance = torch.tensor([3.5]).expand(b) if model.config.guidance_embeds else None
    text = batch["text_embeds"]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x0.dtype)
    pred = model(hidden_states=noisy, timestep=timesteps / 1000, guidance=guidance,
                 pooled_projections=batch["pooled_embeds"], encoder_hidden_states=text,
                 txt_ids=torch.zeros(text.shape[1], 3), img_ids=img_ids, return_dict=False)[0]  # fmt: skip
    pred = FluxPipeline._unpack_latents(pred, height=h * 8, width=w * 8, vae_scale_factor=8)
    return torch.mean(((pred - (noise - x0)) ** 2).reshape(b, -1), 1).mean().item()


def unet_loss(model, sched, batch, g) -> float:
    x0, noise = draws(batch, g)
    b, _, h, w = x0.shape
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).long()
    noisy = sched.add_noise(x0, noise, t)
    time_ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32).repeat(b, 1)
    pred = model(
        noisy,
        t,
        encoder_hidden_states=batch["text_embeds"],
        added_cond_kwargs={"text_embeds": batch["pooled_embeds"], "time_ids": time_ids},
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), noise.float(), reduction="mean").item()


def hunyuan_loss(model, beta_end, batch, g) -> float:
    x0, noise = draws(batch, g)
    b, _, h, w = x0.shape
    t = torch.randint(0, 1000, (b,), generator=g)
    diffusion = create_diffusion(noise_schedule="scaled_linear", predict_type="v_prediction", learn_sigma=True,
                                 mse_loss_weight_type="constant", beta_start=0.00085, beta_end=beta_end)  # fmt: skip
    p = model.config.patch_size
    grid = (h // p, w // p)
    rope = get_2d_rotary_pos_embed(
        model.inner_dim // model.num_heads, get_resize_crop_region_for_grid(grid, 512 // 8 // p), grid, output_type="pt"
    )
    meta = torch.tensor([[h * 8, w * 8, h * 8, w * 8, 0, 0]], dtype=torch.float32).repeat(b, 1)

    def run(x_t, steps, **_):
        out = model(
            x_t,
            steps.float(),
            encoder_hidden_states=batch["text_embeds"],
            text_embedding_mask=batch["text_mask"],
            encoder_hidden_states_t5=batch["text_embeds_t5"],
            text_embedding_mask_t5=batch["text_mask_t5"],
            image_meta_size=meta,
            style=torch.zeros(b, dtype=torch.long),
            image_rotary_emb=rope,
            return_dict=False,
        )[0]
        return dict(x=out)

    import hydit.diffusion.gaussian_diffusion as gd

    real_randint, gd.th.randint = gd.th.randint, lambda *a, **k: t
    try:
        return diffusion.training_losses(model=run, x_start=x0, noise=noise)["loss"].mean().item()
    finally:
        gd.th.randint = real_randint


def main() -> None:
    out = {}
    with torch.no_grad():
        for (family, preset), _ in DENOISERS.items():
            model = denoiser((family, preset))
            for h, w in SIZES:
                batch = image_batch(family, preset, h, w)
                for seed in SEEDS.get((family, h, w), (0, 1)):
                    g = torch.Generator().manual_seed(seed)
                    if family == "hunyuandit":
                        for name, beta_end in (("default", 0.03), ("v1.2", 0.018)):
                            g = torch.Generator().manual_seed(seed)
                            out[(family, preset, name, h, w, seed)] = hunyuan_loss(model, beta_end, batch, g)
                        continue
                    sched = SCHEDULERS.get(f"{family}/{preset}", SCHEDULERS.get(family))()
                    fn = {"sd3": sd3_loss, "flux": flux_loss}.get(family, unet_loss)
                    out[(family, preset, "default", h, w, seed)] = fn(model, sched, batch, g)
    print("REFERENCE = {")
    for key, value in out.items():
        print(f"    {key!r}: {value!r},")
    print("}")


if __name__ == "__main__":
    main()
