"""Write the tests/facts/ tables for the released HunyuanVideo (13B, T2V cfg-distilled): its transformer, its VAE and
its LLaVA-Llama-3 text encoder, from code and values that come from OUTSIDE this project (never from
engines/models/variants.py). The CLIP-L text encoder (text_encoder_2) is the shared `clip_l_text.json`
(docs/fidelity/ref_image_facts.py).

The released diffusers folder (hunyuanvideo-community/HunyuanVideo) was made by diffusers'
`scripts/convert_hunyuan_video_to_diffusers.py`: it loads the authors' checkpoints, renames every key and loads the
result *strictly* into the diffusers classes. This script runs that conversion on the authors' own modules built on
the meta device:

- transformer: Tencent/HunyuanVideo@fa14b00 `hyvideo/modules/models.py` `HYVideoDiffusionTransformer` with
  `HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]` (20 double + 40 single blocks, 3072 wide, 24 heads, mlp ratio 4,
  RoPE (16, 56, 56), guidance embedding), 16 latent channels in and out (the "884-16c-hy" VAE, sample_video.py),
  text states 4096 and 768 wide (hyvideo/config.py `--text-states-dim`, `--text-states-dim-2`), the authors' other
  defaults (qkv bias, RMS qk-norm, single_refiner text projection), fed to huggingface/diffusers@58eb52c
  `convert_transformer(path, "HYVideo-T/2-cfgdistill")` (`TRANSFORMER_KEYS_RENAME_DICT`,
  `TRANSFORMER_SPECIAL_KEYS_REMAP`: the fused qkv / single-block linear splits, the adaLN scale-shift swap, the token
  refiner's names) with its `torch.load` replaced by the meta state dict. The strict load proves the conversion's
  config builds exactly the authors' layout.
- VAE: the authors' `hyvideo/vae/autoencoder_kl_causal_3d.py` `AutoencoderKLCausal3D`, configured by the config.json
  that ships with their checkpoint (ckpts/hunyuan-video-t2v-720p/vae/config.json; `hyvideo/vae/__init__.py`
  `load_vae` reads it with `load_config(vae_path)`). That file is not in their repository; its text is quoted
  verbatim in kohya-ss/musubi-tuner@61fdd35 `src/musubi_tuner/hunyuan_model/vae.py` (`load_vae`: "use fixed config
  for Hunyuan's VAE", `"_class_name": "AutoencoderKLCausal3D"`, `"_diffusers_version": "0.4.2"`): 4
  DownEncoderBlockCausal3D / UpDecoderBlockCausal3D blocks 128/256/512/512 wide, 2 layers, 16 latent channels, 32
  groups, 4x time, mid-block attention, scaling_factor 0.476986. Built on meta and fed to `convert_vae(path)` (no
  renames, strict load into `AutoencoderKLHunyuanVideo()`), its `torch.load` replaced the same way.
- text encoder: the text tower of xtuner/llava-llama-3-8b-v1_1-transformers, which the authors extract with
  `hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py` (`LlavaForConditionalGeneration.language_model`), as the
  released folder's `text_encoder/` holds it: a transformers `LlamaModel`. Its config.json values (vocab 128320 =
  Llama-3's 128256 + LLaVA's added tokens, hidden 4096, ffn 14336, 32 layers, 32 heads, 8 key/value heads, head dim
  128, rope_theta 500000, 8192 positions, RMS eps 1e-5, no attention / MLP bias, untied) as quoted in
  kohya-ss/musubi-tuner@c568022 `src/musubi_tuner/frame_pack/framepack_utils.py` `LLAMA_CONFIG` ("Text Encoder configs
  are copied from HunyuanVideo repo", `"architectures": ["LlamaModel"]`, loaded as
  hunyuanvideo-community/HunyuanVideo's `text_encoder`), the same values as the authors' extracted
  `LlamaForCausalLM` config in kohya-ss/musubi-tuner@aa0c7c3 `src/musubi_tuner/hunyuan_model/text_encoder.py`.

Stubs: `einops` (imported by the modules, used only in forward passes). Run: .venv/bin/python
docs/fidelity/ref_hunyuanvideo_facts.py (needs the HunyuanVideo and diffusers mirrors fetched under /work/.mirror).
Prints one line per table (file, keys, parameters), writes tests/facts/hunyuanvideo*.json.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fidelity import released_shapes  # noqa: E402

AUTHORS = "/work/.mirror/Tencent+HunyuanVideo/repo"
AUTHORS_REV = "fa14b00"
DIFFUSERS = "/work/.mirror/huggingface+diffusers/repo"
DIFFUSERS_REV = "58eb52c"
SCRIPT = "scripts/convert_hunyuan_video_to_diffusers.py"
CONVERSION = f"huggingface/diffusers@{DIFFUSERS_REV}:{SCRIPT}"
MODEL = "HYVideo-T/2-cfgdistill"
VARIANT = ["hunyuanvideo", "hunyuanvideo-13b"]

#: ckpts/hunyuan-video-t2v-720p/vae/config.json, as quoted in kohya-ss/musubi-tuner@61fdd35
#: src/musubi_tuner/hunyuan_model/vae.py (`load_vae`'s CONFIG_JSON)
HUNYUAN_VAE = {
    "_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4, "in_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256, "sample_tsize": 64,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4, "scaling_factor": 0.476986, "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}  # fmt: skip
#: text_encoder/config.json (LLaVA-Llama-3-8B's text tower), as quoted in kohya-ss/musubi-tuner@c568022
#: src/musubi_tuner/frame_pack/framepack_utils.py `LLAMA_CONFIG` (= @aa0c7c3 hunyuan_model/text_encoder.py's)
LLAVA_LLAMA3_TEXT = dict(
    vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
)  # fmt: skip


def _git_show(git_dir: str, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _authors_package() -> None:
    """hyvideo/modules, hyvideo/vae and hyvideo/utils/helpers.py at the revision as an importable package (only
    called, never copied). The package __init__ files are left empty: hyvideo/vae/__init__.py holds only the
    checkpoint loader (`load_vae`), which reads files this script does not have."""
    root = Path(tempfile.mkdtemp())
    files = subprocess.run(["git", f"--git-dir={AUTHORS}", "ls-tree", "-r", "--name-only", AUTHORS_REV, "hyvideo"],
                           check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    for path in files:
        if path.startswith(("hyvideo/modules/", "hyvideo/vae/", "hyvideo/utils/helpers.py")) and path.endswith(".py"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(_git_show(AUTHORS, AUTHORS_REV, path))
    for pkg in ("hyvideo", "hyvideo/utils", "hyvideo/vae"):
        (root / pkg / "__init__.py").write_text("")
    einops = types.ModuleType("einops")
    einops.rearrange = einops.repeat = None
    sys.modules.setdefault("einops", einops)
    sys.path.insert(0, str(root))


def _their_script() -> Any:
    path = Path(tempfile.mkdtemp()) / "convert_hunyuan_video_to_diffusers.py"
    path.write_text(_git_show(DIFFUSERS, DIFFUSERS_REV, SCRIPT))
    spec = importlib.util.spec_from_file_location("convert_hunyuan_video_to_diffusers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(name: str, source: str, module: nn.Module, component: str) -> None:
    keys = released_shapes(module)
    table = {"source": source, "used_by": [[*VARIANT, component]],
             "keys": {k: list(v) for k, v in sorted(keys.items())}}  # fmt: skip
    (REPO / "tests" / "facts" / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}.json: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def _converted(convert: Any, theirs: nn.Module, *args: str) -> nn.Module:
    """Run one of the script's converters with its checkpoint read (`torch.load`) answering the meta state dict."""
    with mock.patch.object(torch, "load", lambda *a, state=theirs.state_dict(), **k: dict(state)):
        model = convert(*args)
    assert all(p.is_meta for p in model.parameters())
    return model


def main() -> None:
    _authors_package()
    script = _their_script()

    models = importlib.import_module("hyvideo.modules.models")
    args = types.SimpleNamespace(text_states_dim=4096, text_states_dim_2=768)
    with torch.device("meta"):
        theirs = models.HYVideoDiffusionTransformer(args, in_channels=16, out_channels=16,
                                                    **models.HUNYUAN_VIDEO_CONFIG[MODEL])  # fmt: skip
    authors = sum(p.numel() for p in theirs.parameters())
    model = _converted(script.convert_transformer, theirs, "mp_rank_00_model_states.pt", MODEL)
    source = (
        f"Tencent/HunyuanVideo@{AUTHORS_REV} hyvideo/modules/models.py HYVideoDiffusionTransformer({MODEL}) on "
        f"meta -> {CONVERSION} convert_transformer; authors' count {authors:,}"
    )
    _write("hunyuanvideo-13b_transformer", source, model, "transformer")

    causal_3d = importlib.import_module("hyvideo.vae.autoencoder_kl_causal_3d")
    with torch.device("meta"):
        their_vae = causal_3d.AutoencoderKLCausal3D.from_config(HUNYUAN_VAE)
    vae = _converted(script.convert_vae, their_vae, "pytorch_model.pt")
    source = (
        f"Tencent/HunyuanVideo@{AUTHORS_REV} hyvideo/vae/autoencoder_kl_causal_3d.py AutoencoderKLCausal3D with the "
        "released ckpts/hunyuan-video-t2v-720p/vae/config.json (as quoted in kohya-ss/musubi-tuner@61fdd35 "
        f"src/musubi_tuner/hunyuan_model/vae.py) on meta -> {CONVERSION} convert_vae"
    )
    _write("hunyuanvideo_vae", source, vae, "vae")

    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig(**LLAVA_LLAMA3_TEXT))
    source = (
        "xtuner/llava-llama-3-8b-v1_1-transformers text tower (Tencent/HunyuanVideo "
        "hyvideo/utils/preprocess_text_encoder_tokenizer_utils.py), text_encoder/config.json as quoted in "
        "kohya-ss/musubi-tuner@c568022 src/musubi_tuner/frame_pack/framepack_utils.py LLAMA_CONFIG; "
        "transformers LlamaModel"
    )
    _write("hunyuanvideo_llava_llama3_8b_text", source, llama, "text_encoder")


if __name__ == "__main__":
    main()
