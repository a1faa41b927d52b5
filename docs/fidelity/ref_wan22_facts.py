"""Write tests/facts/wan2.2-t2v-a14b_transformer.json and wan2.2-i2v-a14b_transformer.json: the released Wan2.2 A14B
expert pairs' key layouts, from code that comes from OUTSIDE this project (never from engines/models/variants.py).

Wan-AI/Wan2.2-T2V-A14B-Diffusers and Wan-AI/Wan2.2-I2V-A14B-Diffusers were made by huggingface/diffusers@58eb52c
`scripts/convert_wan_to_diffusers.py`: for "Wan2.2-T2V-A14B" and "Wan2.2-I2V-14B-720p" it converts
`high_noise_model/` into the pipeline's `transformer` and `low_noise_model/` into `transformer_2` with one
`get_transformer_config` per release and loads both *strictly* into `WanTransformer3DModel`, then writes
`WanPipeline(..., boundary_ratio=0.875)` (T2V) or `WanImageToVideoPipeline(..., boundary_ratio=0.9)` with no image
encoder (I2V: in_channels 36, no `image_dim`, `added_kv_proj_dim` None), both on the Wan2.1 VAE. This script builds
the authors' Wan-Video/Wan2.2@42bf4cf `wan/modules/model.py` `WanModel` on the meta device, sized by their
`wan/configs/wan_t2v_A14B.py` / `wan_i2v_A14B.py` (dim 5120, ffn 13824, 40 heads, 40 layers; the I2V in_dim 36 = 16
noisy + 4 mask + 16 image latents, as `wan/image2video.py` concatenates `y`), and feeds it to the script's
`convert_transformer(model_type, stage)` for each stage, as docs/fidelity/ref_wan_facts.py does for the other releases
(whose helpers it calls). One table serves both experts of a release (`used_by` names `transformer` and
`transformer_2`): the script asserts the two conversions give the same layout.

Run: .venv/bin/python docs/fidelity/ref_wan22_facts.py (needs the Wan2.2 and diffusers mirrors under /work/.mirror).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ref_wan_facts as ref  # noqa: E402

from tests.fidelity import released_shapes  # noqa: E402  (ref_wan_facts put the repository on the path)

# (our family, variant, the conversion script's model_type, the authors' config module and attribute, their
#  model_type, in_dim)
PAIRS = [
    ("wan", "wan2.2-t2v-a14b", "Wan2.2-T2V-A14B", "wan_t2v_A14B", "t2v_A14B", "t2v", 16),
    ("wan_i2v", "wan2.2-i2v-a14b", "Wan2.2-I2V-14B-720p", "wan_i2v_A14B", "i2v_A14B", "i2v", 36),
]


def write_pair(family: str, variant: str, model_type: str, module: str, attr: str, kind: str, in_dim: int) -> None:
    pkg = ref._authors_package(f"wan22_{kind}_a14b_ref", ref.WAN22, ref.WAN22_REV, [
        "modules/model.py", "modules/attention.py", "configs/shared_config.py", f"configs/{module}.py"])  # fmt: skip
    script = ref._their_script()
    script.WanTransformer3DModel = ref._StayOnMeta
    script.snapshot_download = lambda *a, **k: "/nonexistent"
    c = getattr(importlib.import_module(f"{pkg}.configs.{module}"), attr)
    converted = {}
    for stage in (c.high_noise_checkpoint, c.low_noise_checkpoint):  # 'high_noise_model', 'low_noise_model'
        with torch.device("meta"):
            theirs = importlib.import_module(f"{pkg}.modules.model").WanModel(
                model_type=kind, patch_size=c.patch_size, text_len=c.text_len, in_dim=in_dim, dim=c.dim,
                ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, text_dim=4096, out_dim=16, num_heads=c.num_heads,
                num_layers=c.num_layers, window_size=c.window_size, qk_norm=c.qk_norm,
                cross_attn_norm=c.cross_attn_norm, eps=c.eps,
            )  # fmt: skip
        authors = sum(p.numel() for p in theirs.parameters())
        assert not any("img_emb" in k for k in theirs.state_dict()), "Wan2.2's WanModel has no image embedding"
        script.load_sharded_safetensors = lambda _dir, sd=theirs.state_dict(): dict(sd)
        converted[stage] = script.convert_transformer(model_type, stage=stage)
    high, low = converted.values()
    assert released_shapes(high) == released_shapes(low), "the two experts' layouts differ"
    assert high.config.image_dim is None and high.config.in_channels == in_dim
    i2v = kind == "i2v"
    built = "WanModel(model_type='i2v')" if i2v else "WanModel"
    source = (f"Wan-Video/Wan2.2@{ref.WAN22_REV} wan/modules/model.py {built}"
              f" on meta -> {ref.CONVERSION} {variant}: {module}.{attr}{' (in_dim 36)' if i2v else ''}, "
              f"convert_transformer({model_type!r}, stage='high_noise_model' / 'low_noise_model'); authors' count "
              f"{authors:,} per expert")  # fmt: skip
    used_by = [[family, variant, "transformer"], [family, variant, "transformer_2"]]
    ref._write(f"{variant}_transformer", source, used_by, high)


def main() -> None:
    for pair in PAIRS:
        write_pair(*pair)


if __name__ == "__main__":
    main()
