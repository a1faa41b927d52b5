"""Write tests/facts/ tables for the released HunyuanVideo-1.5 480p text-to-video transformer, its VAE and its
Qwen2.5-VL text encoder, from code and values that come from OUTSIDE this project (never engines/models/variants.py).

The released diffusers folders (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*) were made by diffusers'
`scripts/convert_hunyuan_video1_5_to_diffusers.py`: it loads the authors' checkpoint, renames every key
(`convert_hyvideo15_transformer_to_diffusers`, `convert_hunyuan_video_15_vae_checkpoint_to_diffusers`) and loads the
result *strictly* into `HunyuanVideo15Transformer3DModel(**TRANSFORMER_CONFIGS[...])` / `AutoencoderKLHunyuanVideo15()`.
This script runs that conversion on the authors' own modules built on the meta device:

- transformer: Tencent-Hunyuan/HunyuanVideo-1.5@60783e7 `hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py`
  `HunyuanVideo_1_5_DiffusionTransformer`, sized as the 480p_t2v release (its config.json sits on the Hub, out of
  reach here; the values are the ones the conversion's strict load requires of it: hidden 2048 = 16 heads x 128, 54
  double-stream blocks and no single-stream ones, 32 latent channels with the concatenated condition, RMS qk-norm,
  the 2-block token refiner on 3584-wide Qwen2.5-VL states, the ByT5 glyph mapper, the 1152-wide SigLIP vision
  projection, condition-type embeddings), through huggingface/diffusers@58eb52c
  `convert_transformer(args)` (`--transformer_type 480p_t2v`; its download replaced by the meta state dict). The
  authors' count is printed beside the table: 8,326,608,160 ("8.3 billion parameters", their README).
- VAE: the authors' `hyvideo/models/autoencoders/hunyuanvideo_15_vae.py` `AutoencoderKLConv3D` (3 -> 32 latent
  channels, blocks 128/256/512/1024/1024, 2 layers, 16x spatial, 4x temporal, matched channels) through
  `convert_vae(args)`, which builds the diffusers class with its defaults.
- text encoder: Qwen/Qwen2.5-VL-7B-Instruct's language model (the conversion's `load_mllm` takes
  `AutoModel.from_pretrained(...).language_model`), from its config.json (vocab 152064, hidden 3584, ffn 18944, 28
  layers, 28 heads, 4 KV heads), built as transformers' `Qwen2_5_VLTextModel`.
  The ByT5 glyph encoder (google/byt5-small with Glyph-SDXL-v2's color and font tokens added) has no table: its
  vocabulary size comes from Glyph-SDXL-v2's asset files, which could not be read here, so the variant leaves it out.

Stubs: `einops` and `loguru` (imported by the authors' modules, used only in forward passes and logging). Run:
    .venv/bin/python docs/fidelity/ref_hunyuanvideo15_facts.py
(needs the HunyuanVideo-1.5 and diffusers mirrors fetched under /work/.mirror). Prints one line per table (file, keys,
parameters), writes tests/facts/hunyuanvideo1.5*.json.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

HY15 = "/work/.mirror/Tencent-Hunyuan+HunyuanVideo-1.5/repo"
HY15_REV = "60783e7"
DIFFUSERS = "/work/.mirror/huggingface+diffusers/repo"
DIFFUSERS_REV = "58eb52c"
SCRIPT = "scripts/convert_hunyuan_video1_5_to_diffusers.py"
CONVERSION = f"huggingface/diffusers@{DIFFUSERS_REV}:{SCRIPT}"
VARIANT = ["hunyuanvideo15", "hunyuanvideo1.5-t2v-480p"]

#: HunyuanVideo_1_5_DiffusionTransformer arguments of the 480p_t2v release (see the module docstring)
TRANSFORMER_480P_T2V = dict(
    patch_size=[1, 1, 1], in_channels=32, concat_condition=True, out_channels=32, hidden_size=2048, heads_num=16,
    mlp_width_ratio=4.0, mlp_act_type="gelu_tanh", mm_double_blocks_depth=54, mm_single_blocks_depth=0,
    rope_dim_list=[16, 56, 56], qkv_bias=True, qk_norm=True, qk_norm_type="rms", text_projection="single_refiner",
    use_attention_mask=True, text_states_dim=3584, rope_theta=256, glyph_byT5_v2=True, vision_projection="linear",
    vision_states_dim=1152, use_cond_type_embedding=True,
)  # fmt: skip
#: AutoencoderKLConv3D arguments of the release's vae/ (sample sizes change no shape)
VAE = dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(128, 256, 512, 1024, 1024),
           layers_per_block=2, ffactor_spatial=16, ffactor_temporal=4, sample_size=256, sample_tsize=64,
           scaling_factor=1.03682, downsample_match_channel=True, upsample_match_channel=True)  # fmt: skip
#: Qwen/Qwen2.5-VL-7B-Instruct config.json, the language model's part
QWEN25_VL_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=False)  # fmt: skip


def _git(git_dir: str, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def _authors_package() -> None:
    """The authors' `hyvideo` package at the revision, importable (only called, never copied)."""
    root = Path(tempfile.mkdtemp())
    tarfile.open(fileobj=io.BytesIO(_git(HY15, "archive", HY15_REV, "hyvideo"))).extractall(root)
    for name in ("einops", "loguru"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["einops"].rearrange = sys.modules["einops"].repeat = None
    log = types.SimpleNamespace(info=print, warning=print, error=print, debug=print)
    sys.modules["loguru"].logger = log
    sys.path.insert(0, str(root))


def _their_script() -> Any:
    path = Path(tempfile.mkdtemp()) / "convert_hunyuan_video1_5_to_diffusers.py"
    path.write_bytes(_git(DIFFUSERS, "show", f"{DIFFUSERS_REV}:{SCRIPT}"))
    spec = importlib.util.spec_from_file_location("convert_hunyuan_video1_5_to_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(name: str, source: str, module: nn.Module, used: str) -> None:
    keys = released_shapes(module)
    table = {"source": source, "used_by": [[*VARIANT, used]], "keys": {k: list(v) for k, v in sorted(keys.items())}}
    (REPO / "tests" / "facts" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}.json: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def main() -> None:
    _authors_package()
    script = _their_script()
    args = types.SimpleNamespace(transformer_type="480p_t2v")

    from hyvideo.models.transformers.hunyuanvideo_1_5_transformer import HunyuanVideo_1_5_DiffusionTransformer

    with torch.device("meta"):
        theirs = HunyuanVideo_1_5_DiffusionTransformer(**TRANSFORMER_480P_T2V)
    authors = sum(p.numel() for p in theirs.parameters())
    script.load_original_transformer_state_dict = lambda _args, sd=theirs.state_dict(): dict(sd)
    model = script.convert_transformer(args)  # strict load into HunyuanVideo15Transformer3DModel, on meta
    assert all(p.is_meta for p in model.parameters())
    source = (f"Tencent-Hunyuan/HunyuanVideo-1.5@{HY15_REV} "
              "hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py "
              f"HunyuanVideo_1_5_DiffusionTransformer (480p_t2v sizes) on meta -> {CONVERSION} convert_transformer "
              f"('480p_t2v'); authors' count {authors:,}")  # fmt: skip
    _write("hunyuanvideo1.5-t2v-480p_transformer", source, model, "transformer")

    from hyvideo.models.autoencoders.hunyuanvideo_15_vae import AutoencoderKLConv3D

    with torch.device("meta"):
        their_vae = AutoencoderKLConv3D(**VAE)
    script.load_original_vae_state_dict = lambda _args, sd=their_vae.state_dict(): dict(sd)
    vae = script.convert_vae(args)
    assert all(p.is_meta for p in vae.parameters())
    source = (f"Tencent-Hunyuan/HunyuanVideo-1.5@{HY15_REV} hyvideo/models/autoencoders/hunyuanvideo_15_vae.py "
              f"AutoencoderKLConv3D on meta -> {CONVERSION} convert_vae()")  # fmt: skip
    _write("hunyuanvideo1.5_vae", source, vae, "vae")

    with torch.device("meta"):
        qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**QWEN25_VL_7B))
    source = "Qwen/Qwen2.5-VL-7B-Instruct config.json (language model); transformers Qwen2_5_VLTextModel"
    _write("hunyuanvideo1.5_qwen2.5_vl_7b_text", source, qwen, "text_encoder")


if __name__ == "__main__":
    main()
