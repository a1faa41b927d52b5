"""Write tests/facts/wan2.2-t2v-a14b_transformer.json: the released Wan2.2 T2V-A14B experts' key layout, from code that
comes from OUTSIDE this project (never from engines/models/variants.py).

Wan-AI/Wan2.2-T2V-A14B-Diffusers was made by huggingface/diffusers@58eb52c `scripts/convert_wan_to_diffusers.py`: for
"Wan2.2-T2V-A14B" it converts `high_noise_model/` into the pipeline's `transformer` and `low_noise_model/` into
`transformer_2` with one `get_transformer_config("Wan2.2-T2V-A14B")` and loads both *strictly* into
`WanTransformer3DModel` (and writes `WanPipeline(..., boundary_ratio=0.875)` on the Wan2.1 VAE). This script builds the
authors' Wan-Video/Wan2.2@42bf4cf `wan/modules/model.py` `WanModel` on the meta device, sized by their
`wan/configs/wan_t2v_A14B.py` (dim 5120, ffn 13824, 40 heads, 40 layers; both experts share the config), and feeds it
to the script's `convert_transformer("Wan2.2-T2V-A14B", stage)` for each stage, exactly as
docs/fidelity/ref_wan_facts.py does for the other releases (whose helpers it calls). One table serves both experts
(`used_by` names `transformer` and `transformer_2`): the script asserts the two conversions give the same layout.

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

VARIANT, MODEL_TYPE = "wan2.2-t2v-a14b", "Wan2.2-T2V-A14B"


def main() -> None:
    pkg = ref._authors_package("wan22_a14b_ref", ref.WAN22, ref.WAN22_REV, [
        "modules/model.py", "modules/attention.py", "configs/shared_config.py", "configs/wan_t2v_A14B.py"])  # fmt: skip
    script = ref._their_script()
    script.WanTransformer3DModel = ref._StayOnMeta
    script.snapshot_download = lambda *a, **k: "/nonexistent"
    c = importlib.import_module(f"{pkg}.configs.wan_t2v_A14B").t2v_A14B
    converted = {}
    for stage in (c.high_noise_checkpoint, c.low_noise_checkpoint):  # 'high_noise_model', 'low_noise_model'
        with torch.device("meta"):
            theirs = importlib.import_module(f"{pkg}.modules.model").WanModel(
                model_type="t2v", patch_size=c.patch_size, text_len=c.text_len, in_dim=16, dim=c.dim,
                ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, text_dim=4096, out_dim=16, num_heads=c.num_heads,
                num_layers=c.num_layers, window_size=c.window_size, qk_norm=c.qk_norm,
                cross_attn_norm=c.cross_attn_norm, eps=c.eps,
            )  # fmt: skip
        authors = sum(p.numel() for p in theirs.parameters())
        script.load_sharded_safetensors = lambda _dir, sd=theirs.state_dict(): dict(sd)
        converted[stage] = script.convert_transformer(MODEL_TYPE, stage=stage)
    high, low = converted.values()
    assert released_shapes(high) == released_shapes(low), "the two experts' layouts differ"
    source = (f"Wan-Video/Wan2.2@{ref.WAN22_REV} wan/modules/model.py WanModel on meta -> {ref.CONVERSION} "
              f"{VARIANT}: wan_t2v_A14B.t2v_A14B, convert_transformer({MODEL_TYPE!r}, stage='high_noise_model' / "
              f"'low_noise_model'); authors' count {authors:,} per expert")  # fmt: skip
    used_by = [["wan", VARIANT, "transformer"], ["wan", VARIANT, "transformer_2"]]
    ref._write(f"{VARIANT}_transformer", source, used_by, high)


if __name__ == "__main__":
    main()
