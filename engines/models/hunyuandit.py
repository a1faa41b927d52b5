"""Hunyuan-DiT text-to-image: diffusers' HunyuanDiT2DModel, AutoencoderKL, DDPM and HunyuanDiTPipeline; a
bilingual CLIP text tower shipped as a `BertModel` (77 tokens) and an mT5 encoder loaded as `T5EncoderModel`
(256 tokens), both per-token states with attention masks, as `HunyuanDiTPipeline.encode_prompt` returns them.

The objective is the released one (Tencent-Hunyuan/HunyuanDiT hydit/diffusion/gaussian_diffusion.py
`training_losses`, created as hydit/train_deepspeed.py creates it): DDPM with scaled-linear betas from 0.00085 to
0.018 for v1.2 (hydit/train.sh) or 0.03 for v1.0/v1.1 (train_v1.1.sh; the v1.1-Diffusers scheduler_config.json),
picked by whether the transformer has the <= 1.1 size/style conditions; uniform integer t, v-prediction. The
transformer has learned sigma (LEARNED_RANGE): it outputs the v-prediction, then the variance interpolation. The
loss per sample is the MSE on the first half plus the improved-DDPM variational bound in bits (`vb`) on the second
half with the mean detached (the KL to the true posterior, and the discretised decoder NLL at t = 0), then the mean
over the batch, as their `training_losses` + `loss.mean()`. Sampling uses diffusers' pipeline, which discards the
variance half (`noise_pred.chunk(2)`) and the scheduler's fixed variance, as the release's diffusers port does.

Conditioning is built as the pipeline builds it: 2D rotary embeddings from `get_resize_crop_region_for_grid` +
`get_2d_rotary_pos_embed`, image size `(original h, w, target h, w, crop top, left)` and `style` 0. Size and
style only enter models with `use_style_cond_and_image_meta_size` (v1.0/v1.1 and the tiny preset; v1.2 drops
them). Generation turns the pipeline's resolution binning off: it would map every size to a 1024-px bucket.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.encoders import (
    T5_PRESETS,
    ImageFamily,
    denoiser_config,
    load_image_vae,
    load_text_encoders,
)
from flowspeed.engines.models.registry import ddpm_noised, from_pretrained, pick_preset, register_family, seeded_init
from flowspeed.engines.models.tokenizer import byte_level_tokenizer
from torch import nn
from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

# The pipeline pads CLIP prompts to 77 and mT5 prompts to 256 tokens whatever the config says, and the
# transformer's learned padding embedding (text_len + text_len_t5 rows) is sized for exactly these.
TEXT_LENGTHS = (77, 256)
TEXT_PARTS: list[tuple[str, str, type]] = [("text_encoder", "tokenizer", BertModel),
              ("text_encoder_2", "tokenizer_2", T5EncoderModel)]  # fmt: skip
BERT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=TEXT_LENGTHS[0]),
}  # fmt: skip
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # 4 blocks so the long skips (block 0 -> block 3) are exercised; hidden = heads x head dim; size/style on.
    "tiny": dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, hidden_size=32, patch_size=2,
                 sample_size=8, mlp_ratio=2.0, pooled_projection_dim=32, use_style_cond_and_image_meta_size=True),
}  # fmt: skip
# Tencent-Hunyuan/HunyuanDiT hydit/train_v1.1.sh (v1.0/v1.1 weights; HunyuanDiT-v1.1-Diffusers scheduler_config.json);
# 1000 steps, create_diffusion's default.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", steps_offset=1, clip_sample=False)  # fmt: skip
V1_2_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, beta_end=0.018)  # hydit/train.sh, the v1.2 recipe
# The pipeline computes rotary embeddings on a grid cropped out of a 512-px base (512 // 8 // patch_size).
ROPE_BASE_PIXELS = 512


def rotary_embedding(transformer: HunyuanDiT2DModel, h: int, w: int, device: torch.device) -> tuple:
    """(cos, sin), each (h/p * w/p, head_dim): `HunyuanDiTPipeline.__call__` step 7, on latent sizes h, w."""
    p = transformer.config.patch_size
    grid = (h // p, w // p)
    crop = get_resize_crop_region_for_grid(grid, ROPE_BASE_PIXELS // 8 // p)
    head_dim = transformer.inner_dim // transformer.num_heads
    return get_2d_rotary_pos_embed(head_dim, crop, grid, device=device, output_type="pt")


def variational_bound_bits(
    scheduler: DDPMScheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_pred: torch.Tensor,
    var_values: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Improved DDPM's L_vb per sample, in bits, for a LEARNED_RANGE variance (Nichol & Dhariwal 2021), as the
    Hunyuan-DiT release trains its variance channels: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the
    discretised Gaussian decoder NLL at t = 0. The mean comes from the (detached) v-prediction, so only the variance
    half gets this gradient. Schedule terms in float64, as their numpy tables."""
    betas = scheduler.betas.double()
    ac = scheduler.alphas_cumprod.double()
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # "clipped": t = 0 takes t = 1's

    def at(table: torch.Tensor) -> torch.Tensor:
        return table[t.cpu()].float().to(x0.device).view(-1, *([1] * (x0.ndim - 1)))

    coef_x0 = at(betas * ac_prev.sqrt() / (1.0 - ac))
    coef_xt = at((1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac))
    true_mean, true_logvar = coef_x0 * x0 + coef_xt * x_t, at(post_logvar)
    x0_hat = at(ac.sqrt()) * x_t - at((1.0 - ac).sqrt()) * v_pred
    mean = coef_x0 * x0_hat + coef_xt * x_t
    frac = (var_values + 1.0) / 2.0  # [-1, 1] -> [posterior variance, beta_t], interpolated in log space
    logvar = frac * at(betas.log()) + (1.0 - frac) * true_logvar
    kl = 0.5 * (
        -1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * (-logvar).exp()
    )
    nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)
    return torch.where(t == 0, nll.flatten(1).mean(1), kl.flatten(1).mean(1)) / math.log(2.0)


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of a Gaussian integrated over x's 8-bit bin (width 2/255 on [-1, 1]; the edge bins are open)."""

    def cdf(z: torch.Tensor) -> torch.Tensor:  # the tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    inv_std = torch.exp(-log_scale)
    upper, lower = cdf(inv_std * (x - mean + 1.0 / 255.0)), cdf(inv_std * (x - mean - 1.0 / 255.0))
    inner = torch.log((upper - lower).clamp(min=1e-12))
    top = torch.where(x > 0.999, torch.log((1.0 - lower).clamp(min=1e-12)), inner)
    return torch.where(x < -0.999, torch.log(upper.clamp(min=1e-12)), top)


class HunyuanDiT(ImageFamily):
    name = "hunyuandit"
    text_parts = TEXT_PARTS
    pipeline_cls = HunyuanDiTPipeline
    # the pipeline takes no default for its safety checker
    pipeline_extras = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def load_vae(self, cfg: ModelConfig) -> nn.Module:
        return load_image_vae(cfg, scaling_factor=0.13025, shift_factor=0.0)  # sdxl-vae-fp16-fix, as released

    def text_max_lengths(self, cfg: ModelConfig) -> list[int]:
        return list(TEXT_LENGTHS)  # fixed by the pipeline; model.max_text_length does not apply

    def load_text_encoder(self, cfg: ModelConfig) -> tuple[Any, nn.Module]:
        """Pretrained: the pipeline's BertTokenizer/BertModel and mT5 tokenizer/T5EncoderModel subfolders.
        Tiny: byte-level tokenizers (no vocabulary file ships offline) and random BERT / T5 encoders."""
        if cfg.text_encoder.pretrained:
            return load_text_encoders(cfg, TEXT_PARTS, list(TEXT_LENGTHS))
        toks, encs = [], []
        for i, max_len in enumerate(TEXT_LENGTHS):
            tok = byte_level_tokenizer()
            tok.model_max_length = max_len
            ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if i == 0:
                config: Any = BertConfig(**ids, **pick_preset(cfg.text_encoder, BERT_PRESETS, "text_encoder"))
                cls: type = BertModel
            else:
                config = T5Config(decoder_start_token_id=tok.pad_token_id, **ids,
                                  **pick_preset(cfg.text_encoder, T5_PRESETS, "text_encoder"))  # fmt: skip
                cls = T5EncoderModel
            with seeded_init(cfg.seed + 2 + i):
                encs.append(cls(config))
            toks.append(tok)
        return tuple(toks), nn.ModuleList(encs).eval().requires_grad_(False)

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int, latent_channels: int) -> nn.Module:
        if cfg.transformer.pretrained:
            return from_pretrained(HunyuanDiT2DModel, cfg.transformer, "transformer")
        with seeded_init(cfg.seed + 3):
            # cross_attention_dim: the CLIP width (cached text_embeds); the mT5 width is the tiny T5's.
            return HunyuanDiT2DModel(
                in_channels=latent_channels, cross_attention_dim=text_embed_dim, learn_sigma=True,
                cross_attention_dim_t5=T5_PRESETS["tiny"]["d_model"], text_len=TEXT_LENGTHS[0],
                text_len_t5=TEXT_LENGTHS[1], **pick_preset(cfg.transformer, TRANSFORMER_PRESETS, "transformer"),
            )  # fmt: skip

    def load_scheduler(self, cfg: ModelConfig) -> DDPMScheduler:
        """v1.0/v1.1's betas (to 0.03) for a transformer with the size/style conditions, else v1.2's (to 0.018)."""
        config = denoiser_config(cfg, HunyuanDiT2DModel, TRANSFORMER_PRESETS)
        old = config.get("use_style_cond_and_image_meta_size", True)  # diffusers' default is the <= 1.1 layout
        return DDPMScheduler(**(SCHEDULER_CONFIG if old else V1_2_SCHEDULER_CONFIG))

    def encode_text(self, tokenizer: Any, encoder: nn.Module, captions: list[str], max_length: int) -> dict:
        """CLIP (B, 77, D_clip) and mT5 (B, 256, D_t5) states with their (B, L) masks; `max_length` is unused:
        the pipeline's lengths are fixed."""
        device = next(encoder.parameters()).device
        if device.type == "meta":  # a variant's shape-only build: BERT's padding-mask check reads values
            b, (clip, t5) = len(captions), encoder
            return {"text_embeds": torch.empty(b, TEXT_LENGTHS[0], clip.config.hidden_size, device=device),
                    "text_mask": torch.ones(b, TEXT_LENGTHS[0], dtype=torch.long, device=device),
                    "text_embeds_t5": torch.empty(b, TEXT_LENGTHS[1], t5.config.d_model, device=device),
                    "text_mask_t5": torch.ones(b, TEXT_LENGTHS[1], dtype=torch.long, device=device)}  # fmt: skip
        pipe = self._text_pipe(tokenizer, encoder)
        out = {}
        for index, suffix in enumerate(("", "_t5")):
            embeds, _, mask, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False,
                                                    max_sequence_length=TEXT_LENGTHS[index],
                                                    text_encoder_index=index)  # fmt: skip
            out[f"text_embeds{suffix}"], out[f"text_mask{suffix}"] = embeds, mask
        return out

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        core = self.core_module(transformer)
        x0, noise, t, noisy = ddpm_noised(batch, scheduler, generator)
        (b, c, h, w), device = x0.shape, x0.device
        size = (h * self.spatial_compression, w * self.spatial_compression)
        # (original h, w, target h, w, crop top, left): clips are resized whole, never cropped
        meta = torch.tensor([size + size + (0, 0)], dtype=torch.float32, device=device).repeat(b, 1)
        out = transformer(
            noisy,
            t.float(),  # the pipeline passes float timesteps; the size/time embedders take their dtype
            encoder_hidden_states=batch["text_embeds"].float(),
            text_embedding_mask=batch["text_mask"],
            encoder_hidden_states_t5=batch["text_embeds_t5"].float(),
            text_embedding_mask_t5=batch["text_mask_t5"],
            image_meta_size=meta,
            style=torch.zeros(b, dtype=torch.long, device=device),
            image_rotary_emb=rotary_embedding(core, h, w, device),
            return_dict=False,
        )[0].float()  # (B, 2C, h, w): the v-prediction, then the learned variance interpolation
        pred, var_values = out[:, :c], out[:, c:]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        mse = ((pred - target) ** 2).flatten(1).mean(1)
        vb = variational_bound_bits(scheduler, x0, noisy, t, pred.detach(), var_values)
        return (mse + vb).mean()

    def call_extras(self, pipe: Any, height: int, width: int) -> dict[str, Any]:
        """Resolution binning off (it would map every size to a 1024-px bucket) and the size conditioning of
        training."""
        return {"use_resolution_binning": False, "original_size": (height, width)}


register_family(HunyuanDiT())
