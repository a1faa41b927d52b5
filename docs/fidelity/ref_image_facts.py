"""Write tests/facts/ tables for the image families' denoisers and VAEs and for the text encoders / VAEs that many
variants share, from configuration values that come from OUTSIDE this project.

Every table is the library class (diffusers, transformers, or Kolors' own ChatGLM code) built on the meta device
with the released configuration, named as the released checkpoint names it (`tests.fidelity.released_shapes`).
The configuration values are taken from (never from engines/models/variants.py):

- SDXL UNet and the 4-channel image VAEs: Stability-AI/generative-models@0ad7de9 configs/inference/sd_xl_base.yaml and
  sd_2_1.yaml (the SD 1/2 first stage, which stabilityai/sd-vae-ft-ema fine-tunes), converted by diffusers' own
  single-file converters (`create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`).
- SD3 / Flux VAEs: huggingface/diffusers@58eb52c scripts/convert_sd3_to_diffusers.py (the SDXL VAE config with 16 latent
  channels and no quant convs) and scripts/convert_flux_to_diffusers.py (SD3's VAE config).
- SD3 transformers: the released transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers and
  stable-diffusion-3.5-large (search tool, docs corpus: num_layers 24 / 38, caption_projection_dim 1536 / 2432,
  pos_embed_max_size 192, qk_norm rms_norm for 3.5 Large); the rest as convert_sd3_to_diffusers.py builds it.
- Flux transformers: diffusers' convert_flux_to_diffusers.py (FluxTransformer2DModel defaults, in_channels 64,
  guidance_embeds from the checkpoint: dev has it, schnell does not).
- HunyuanDiT-v1.2 transformer: Tencent-Hunyuan/HunyuanDiT@d2cb9cd hydit/modules/models.py HUNYUAN_DIT_CONFIG["DiT-g/2"]
  (depth 40, hidden 1408, 16 heads, mlp_ratio 4.3637) and hydit/config.py (text_states_dim 1024 / 2048, text_len
  77 / 256, learn_sigma on); v1.2 has no size/style conditions (hydit/inference.py refuses style_embedder for >= 1.2).
- Kolors UNet: the SDXL UNet above plus Kwai-Kolors/Kolors@0fafa56 kolors/models/unet_2d_condition.py's text_proj
  (encoder_hid_dim 4096 -> 2048) and kolors/pipelines/pipeline_stable_diffusion_xl_chatglm_256.py's added embedding
  (addition_time_embed_dim x 6 + 4096 = 5632).
- Text encoders: the released config.json of google/t5-v1_1-xxl, google/mt5-xxl, google/mt5-xl,
  openai/clip-vit-large-patch14 (search tool, docs corpus), open_clip's ViT-bigG-14.json (text tower of CLIP-G, the
  SDXL/SD3 text_encoder_2), THUDM ChatGLM3-6B's config.json (chatglm3-6b-32k's, same shapes: 28 layers, 4096 wide,
  ffn 13696, 2 multi-query groups, qkv bias, vocab 65024) built with Kolors' own modeling_chatglm.py, and HunyuanDiT's
  bilingual CLIP BertModel (1024 wide, 24 layers, 16 heads, ffn 4096, 512 positions; vocab 47020: no stored copy of
  its config.json, the figure is pinned by the released text_encoder/model.safetensors of 1.41 GB in fp32 =
  352.0M parameters, i.e. 47020 +- ~1200 rows, and the README's "350M").

Run: PYTHONPATH=/tmp/img17/kolors:. .venv/bin/python docs/fidelity/ref_image_facts.py  (Kolors checked out there at
0fafa56). Prints one line per table (file, keys, parameters) and writes tests/facts/<name>.json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

GENERATIVE_MODELS = "/work/.mirror/Stability-AI+generative-models/repo"
KOLORS = Path("/tmp/img17/kolors")

# ---- released config values (sources in the module docstring) ------------------------------------------------------
T5_V11_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)  # google/t5-v1_1-xxl config.json
MT5_XXL = dict(T5_V11_XXL, vocab_size=250112)  # google/mt5-xxl config.json
MT5_XL = dict(
    vocab_size=250112,
    d_model=2048,
    d_kv=64,
    d_ff=5120,
    num_layers=24,
    num_heads=32,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)  # google/mt5-xl config.json
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)  # openai/clip-vit-large-patch14
CHATGLM3 = dict(
    num_layers=28,
    padded_vocab_size=65024,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    seq_length=32768,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_bias_linear=False,
    add_qkv_bias=True,
    rmsnorm=True,
    post_layer_norm=True,
    original_rope=True,
)
HUNYUAN_BERT = dict(
    vocab_size=47020,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=512,
    type_vocab_size=2,
)
SD3_RELEASED = {
    "sd3-medium": dict(num_layers=24, caption_projection_dim=1536),
    "sd3.5-large": dict(num_layers=38, caption_projection_dim=2432, qk_norm="rms_norm"),
}


def _open_clip_bigg_text() -> dict:
    """CLIP-G's text tower from open_clip's ViT-bigG-14.json (the tower SDXL and SD3 ship as text_encoder_2)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "model_configs" / "ViT-bigG-14.json"
    cfg = json.loads(path.read_text())
    text = cfg["text_cfg"]
    width = text["width"]
    return dict(
        vocab_size=text["vocab_size"],
        hidden_size=width,
        intermediate_size=int(width * text.get("mlp_ratio", 4)),
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act="gelu",
        projection_dim=cfg["embed_dim"],
    )


def _ldm_yaml(name: str) -> dict:
    import subprocess

    text = subprocess.run(
        ["git", f"--git-dir={GENERATIVE_MODELS}", "show", f"HEAD:configs/inference/{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return yaml.safe_load(text)


def _sdxl_unet_config() -> dict:
    return dict(create_unet_diffusers_config_from_ldm(_ldm_yaml("sd_xl_base.yaml"), {}, image_size=1024))


def _vae_config(yaml_name: str, image_size: int) -> dict:
    return dict(create_vae_diffusers_config_from_ldm(_ldm_yaml(yaml_name), {}, image_size=image_size))


def _sd3_vae_config() -> dict:
    # convert_sd3_to_diffusers.py: AutoencoderKL.from_config(SDXL's vae, latent_channels=16, no quant convs, ...)
    return dict(
        _vae_config("sd_xl_base.yaml", 1024), latent_channels=16, use_quant_conv=False, use_post_quant_conv=False
    )


def _kolors_chatglm() -> nn.Module:
    """Kolors' own ChatGLMModel (their repo's modeling_chatglm.py), default_init so it stays on meta."""
    pkg = KOLORS / "kolors" / "models"
    sys.path.insert(0, str(pkg))
    spec = importlib.util.spec_from_file_location("configuration_chatglm", pkg / "configuration_chatglm.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    sys.modules["configuration_chatglm"] = conf
    spec = importlib.util.spec_from_file_location("modeling_chatglm", pkg / "modeling_chatglm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["modeling_chatglm"] = mod
    spec.loader.exec_module(mod)
    return mod.ChatGLMModel(conf.ChatGLMConfig(**CHATGLM3), empty_init=False)


def _t5(cfg: dict) -> nn.Module:
    return T5EncoderModel(T5Config(**cfg))


# ---- the tables: name -> (source, builder, used_by) ------------------------------------------------------------------
_T5_USERS = [("cogvideox", v, "text_encoder") for v in ("cogvideox-2b", "cogvideox-5b")] + [
    ("cogvideox_i2v", "cogvideox-5b-i2v", "text_encoder"),
    ("cogvideox1.5", "cogvideox1.5-5b", "text_encoder"),
    ("cogvideox_i2v", "cogvideox1.5-5b-i2v", "text_encoder"),
    ("sd3", "sd3-medium", "text_encoder_3"),
    ("sd3", "sd3.5-large", "text_encoder_3"),
    ("flux", "flux.1-dev", "text_encoder_2"),
    ("flux", "flux.1-schnell", "text_encoder_2"),
    ("opensora", "opensora-v1.0-256", "text_encoder"),
    ("opensora", "opensora-v1.0-512", "text_encoder"),
    ("opensora1.2", "opensora-v1.2", "text_encoder"),
    ("qihoo_t2x", "qihoo-t2x-1.1b", "text_encoder"),
]
_SDXL_VAE_USERS = [
    ("sdxl", "sdxl-base-1.0", "vae"),
    ("kolors", "kolors", "vae"),
    ("hunyuandit", "hunyuandit-v1.2", "vae"),
]
DIFFUSERS = "huggingface/diffusers@58eb52c"
TABLES: dict[str, tuple[str, Callable[[], nn.Module], list]] = {
    "t5_v1_1_xxl_encoder": (
        "google/t5-v1_1-xxl config.json; transformers T5EncoderModel",
        lambda: _t5(T5_V11_XXL),
        _T5_USERS,
    ),
    "mt5_xxl_encoder": (
        "google/mt5-xxl config.json; transformers T5EncoderModel",
        lambda: _t5(MT5_XXL),
        [
            ("opensoraplan", "opensoraplan-v1.2", "text_encoder"),
            ("opensoraplan", "opensoraplan-v1.3", "text_encoder"),
            ("opensoraplan_i2v", "opensoraplan-v1.3-i2v", "text_encoder"),
        ],
    ),
    "mt5_xl_encoder": (
        "google/mt5-xl config.json; transformers T5EncoderModel (HunyuanDiT's text_encoder_2)",
        lambda: _t5(MT5_XL),
        [("hunyuandit", "hunyuandit-v1.2", "text_encoder_2")],
    ),
    "clip_l_text": (
        "openai/clip-vit-large-patch14 config.json; transformers CLIPTextModel",
        lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        [
            ("flux", "flux.1-dev", "text_encoder"),
            ("flux", "flux.1-schnell", "text_encoder"),
            ("sdxl", "sdxl-base-1.0", "text_encoder"),
            ("hunyuanvideo", "hunyuanvideo-13b", "text_encoder_2"),
        ],
    ),
    "clip_l_text_projection": (
        "openai/clip-vit-large-patch14 config.json; transformers CLIPTextModelWithProjection",
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        [("sd3", "sd3-medium", "text_encoder"), ("sd3", "sd3.5-large", "text_encoder")],
    ),
    "clip_g_text_projection": (
        "open_clip model_configs/ViT-bigG-14.json text_cfg; CLIPTextModelWithProjection",
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_open_clip_bigg_text())),
        [
            ("sdxl", "sdxl-base-1.0", "text_encoder_2"),
            ("sd3", "sd3-medium", "text_encoder_2"),
            ("sd3", "sd3.5-large", "text_encoder_2"),
        ],
    ),
    "chatglm3_6b": (
        "THUDM ChatGLM3-6B config.json values; Kwai-Kolors/Kolors@0fafa56 kolors/models/modeling_chatglm.py",
        _kolors_chatglm,
        [("kolors", "kolors", "text_encoder")],
    ),
    "hunyuandit_bert": (
        "HunyuanDiT-v1.2-Diffusers text_encoder (BertModel; vocab from the 1.41 GB fp32 weights)",
        lambda: BertModel(BertConfig(**HUNYUAN_BERT)),
        [("hunyuandit", "hunyuandit-v1.2", "text_encoder")],
    ),
    "sdxl_vae": (
        "Stability-AI/generative-models@0ad7de9 configs/inference/sd_xl_base.yaml first stage via diffusers "
        "create_vae_diffusers_config_from_ldm",
        lambda: AutoencoderKL(**_vae_config("sd_xl_base.yaml", 1024)),
        _SDXL_VAE_USERS,
    ),
    "sd_vae_ft_ema": (
        "Stability-AI/generative-models@0ad7de9 configs/inference/sd_2_1.yaml first stage (the SD VAE "
        "that stabilityai/sd-vae-ft-ema fine-tunes) via create_vae_diffusers_config_from_ldm",
        lambda: AutoencoderKL(**_vae_config("sd_2_1.yaml", 256)),
        [("opensora", "opensora-v1.0-256", "vae"), ("opensora", "opensora-v1.0-512", "vae")],
    ),
    "sd3_vae": (
        f"{DIFFUSERS} scripts/convert_sd3_to_diffusers.py (SDXL VAE, 16 latent channels, no quant convs)",
        lambda: AutoencoderKL(**_sd3_vae_config()),
        [("sd3", "sd3-medium", "vae"), ("sd3", "sd3.5-large", "vae")],
    ),
    "flux_vae": (
        f"{DIFFUSERS} scripts/convert_flux_to_diffusers.py (SD3's VAE config)",
        lambda: AutoencoderKL(**_sd3_vae_config()),
        [("flux", "flux.1-dev", "vae"), ("flux", "flux.1-schnell", "vae")],
    ),
    "sdxl_base_unet": (
        "generative-models@0ad7de9 configs/inference/sd_xl_base.yaml via diffusers "
        "create_unet_diffusers_config_from_ldm",
        lambda: UNet2DConditionModel(**_sdxl_unet_config()),
        [("sdxl", "sdxl-base-1.0", "unet")],
    ),
    "kolors_unet": (
        "sd_xl_base.yaml UNet + Kwai-Kolors/Kolors@0fafa56 text_proj 4096 and add embedding 6*256+4096",
        lambda: UNet2DConditionModel(
            **dict(
                _sdxl_unet_config(),
                encoder_hid_dim=4096,
                encoder_hid_dim_type="text_proj",
                projection_class_embeddings_input_dim=6 * 256 + 4096,
            )
        ),
        [("kolors", "kolors", "unet")],
    ),
    "flux1_dev_transformer": (
        f"{DIFFUSERS} scripts/convert_flux_to_diffusers.py (defaults, guidance_embeds=True)",
        lambda: FluxTransformer2DModel(in_channels=64, guidance_embeds=True),
        [("flux", "flux.1-dev", "transformer")],
    ),
    "flux1_schnell_transformer": (
        f"{DIFFUSERS} scripts/convert_flux_to_diffusers.py (defaults, no guidance embed)",
        lambda: FluxTransformer2DModel(in_channels=64, guidance_embeds=False),
        [("flux", "flux.1-schnell", "transformer")],
    ),
    "hunyuandit_v1_2_transformer": (
        "Tencent-Hunyuan/HunyuanDiT@d2cb9cd hydit/modules/models.py DiT-g/2 + hydit/config.py; diffusers names",
        lambda: HunyuanDiT2DModel(
            in_channels=4,
            patch_size=2,
            hidden_size=1408,
            num_layers=40,
            num_attention_heads=16,
            attention_head_dim=88,
            mlp_ratio=4.3637,
            learn_sigma=True,
            cross_attention_dim=1024,
            cross_attention_dim_t5=2048,
            pooled_projection_dim=1024,
            text_len=77,
            text_len_t5=256,
            use_style_cond_and_image_meta_size=False,
        ),
        [("hunyuandit", "hunyuandit-v1.2", "transformer")],
    ),
}
for _name, _kw in SD3_RELEASED.items():
    TABLES[f"{_name.replace('.', '_').replace('-', '_')}_transformer"] = (
        f"stabilityai/{'stable-diffusion-3-medium' if _name == 'sd3-medium' else 'stable-diffusion-3.5-large'}"
        f"-diffusers transformer/config.json; built as {DIFFUSERS} scripts/convert_sd3_to_diffusers.py builds it",
        lambda kw=_kw: SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            attention_head_dim=64,
            num_attention_heads=kw["num_layers"],
            joint_attention_dim=4096,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
            **kw,
        ),
        [("sd3", _name, "transformer")],
    )


def main() -> None:
    out = REPO / "tests" / "facts"
    for name, (source, build, used_by) in TABLES.items():
        with torch.device("meta"):
            module = build()
        keys = {k: list(v) for k, v in sorted(released_shapes(module).items())}
        table = {"source": source, "used_by": [list(u) for u in used_by], "keys": keys}
        path = out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(path)
        print(f"{path.name}: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


if __name__ == "__main__":
    main()
