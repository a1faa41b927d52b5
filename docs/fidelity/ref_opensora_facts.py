"""Write tests/facts/{stdit-xl2-256,stdit-xl2-512,stdit3-xl2,opensora-vae-v1.2}.json from the authors' modules.

Source: github.com/hpcaitech/Open-Sora, tags v1.0.0 (opensora/models/stdit/stdit.py `STDiT_XL_2`, configs/opensora/
{train,inference}/16x{256,512}x512.py) and v1.2.0 (opensora/models/stdit/stdit3.py `STDiT3_XL_2`, opensora/models/
vae/vae.py `OpenSoraVAE_V1_2`, configs/opensora-v1-2/inference/sample.py). Each module is built on the meta device
with the arguments the released checkpoint was trained with, and its state_dict's names and shapes are written out
(built under accelerate's `init_empty_weights`: parameters on meta, buffers real, as their __init__ calls .item()).

Run (from the repo root, with the two tags unpacked by `git archive <tag> | tar -x -C /tmp/osora/<dir>`):
    .venv/bin/python docs/fidelity/ref_opensora_facts.py /tmp/osora/v10 /tmp/osora/v12
Stubs: see ref_opensora_shim.py. The SDXL VAE inside OpenSoraVAE_V1_2 is built from the config.json values of
stabilityai/sdxl-vae (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae is that VAE), as the hub is unreachable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ref_opensora_shim import AUTOENCODER_CONFIGS, use_tag  # noqa: E402

FACTS = Path(__file__).resolve().parents[2] / "tests" / "facts"
REPO = "hpcaitech/Open-Sora"
# stabilityai/sdxl-vae config.json (what pixart_sigma_sdxlvae_T5_diffusers/vae ships)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


def write(name: str, source: str, used_by: list[list[str]], module: torch.nn.Module) -> None:
    keys = {k: list(v.shape) for k, v in module.state_dict().items()}
    table = {"source": source, "used_by": used_by, "keys": keys}
    path = FACTS / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
    print(f"{name}: {len(keys)} keys, {sum(p.numel() for p in module.parameters()):,} parameters")


def v1_0(src: str) -> None:
    use_tag(src)
    from opensora.models.stdit.stdit import STDiT_XL_2

    for res, scale in ((256, 0.5), (512, 1.0)):
        # configs/opensora/train/16x{res}x{res}.py: 16 frames, space_scale; latent = res / 8 (SD VAE)
        with init_empty_weights():
            model = STDiT_XL_2(input_size=(16, res // 8, res // 8), space_scale=scale, time_scale=1.0)
        source = (f"{REPO}@v1.0.0: opensora/models/stdit/stdit.py STDiT_XL_2(input_size=(16, {res // 8}, "
                  f"{res // 8}), space_scale={scale}) (configs/opensora/train/16x{res}x{res}.py) built on meta; "
                  "pos_embed / pos_embed_temporal are the persistent sin-cos buffers of that size")  # fmt: skip
        write(f"stdit-xl2-{res}.json", source, [["opensora", f"opensora-v1.0-{res}", "transformer"]], model)


def v1_2(src: str) -> None:
    use_tag(src)
    import opensora.models.vae.vae_temporal  # noqa: F401  (registers VAE_Temporal_SD)
    from opensora.models.stdit.stdit3 import STDiT3_XL_2
    from opensora.models.vae.vae import OpenSoraVAE_V1_2

    with init_empty_weights():
        model = STDiT3_XL_2(qk_norm=True)  # configs/opensora-v1-2/inference/sample.py
    source = (
        f"{REPO}@v1.2.0: opensora/models/stdit/stdit3.py STDiT3_XL_2(qk_norm=True) with STDiT3Config "
        "defaults (pred_sigma=True, model_max_length=300) built on meta (hub: hpcai-tech/OpenSora-STDiT-v3)"
    )
    write("stdit3-xl2.json", source, [["opensora1.2", "opensora-v1.2", "transformer"]], model)

    AUTOENCODER_CONFIGS["PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"] = SDXL_VAE
    with init_empty_weights():
        vae = OpenSoraVAE_V1_2(micro_frame_size=17, micro_batch_size=4)
    source = (
        f"{REPO}@v1.2.0: opensora/models/vae/vae.py OpenSoraVAE_V1_2(micro_frame_size=17) (VideoAutoencoder"
        "Pipeline: spatial_vae = diffusers AutoencoderKL with stabilityai/sdxl-vae config.json values, "
        "temporal_vae = vae_temporal.py VAE_Temporal_SD) built on meta (hub: hpcai-tech/OpenSora-VAE-v1.2)"
    )
    write("opensora-vae-v1.2.json", source, [["opensora1.2", "opensora-v1.2", "vae"]], vae)


if __name__ == "__main__":
    v1_0(sys.argv[1])
    v1_2(sys.argv[2])
