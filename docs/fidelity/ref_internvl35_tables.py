"""Fact tables (released key -> shape) for the InternVL3.5 -HF releases (OpenGVLab/InternVL3_5-*-HF).

Run once, outside CI (writes tests/facts/internvl3.5-*.json):

    .venv/bin/python docs/fidelity/ref_internvl35_tables.py

Source: transformers' InternVLForConditionalGeneration built on the meta device from the released config.json
values below, named as transformers writes a checkpoint it loaded (ref_vlm_tables.native_table: the conversion
mapping reversed, so Qwen3-MoE's fused experts are written per expert, as the release stores them). The values
are OpenGVLab's -HF conversion (InternViT-300M-448px-V2.5, or the 6B tower for 38B; image_token_id 151671,
image_seq_length 256, downsample 0.5) with the original release's llm_config, which is the Qwen3 base model's
config.json: Qwen3-0.6B, -1.7B, -4B, -8B, -14B, -32B, -30B-A3B (vocab 151936, head_dim 128, untied lm_head; the
InternVL3_5-1B-HF checkpoint's 751,632,384 language parameters need the separate lm_head). Not flowspeed's
modules or engines/models/variants.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ref_vlm_tables import native_table, write  # noqa: E402

# InternViT-300M-448px-V2.5 and InternViT-6B-448px-V2.5 as the -HF config.json writes them (internvl_vision)
VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                layer_scale_init_value=0.1, use_mean_pooling=True)  # fmt: skip
VIT_6B = dict(VIT_300M, hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
              attention_bias=False, use_qk_norm=True, norm_type="rms_norm")  # fmt: skip


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, kv: int, **moe: Any) -> dict[str, Any]:
    return dict(model_type="qwen3_moe" if moe else "qwen3", vocab_size=151936, hidden_size=hidden,
                intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=128, tie_word_embeddings=False, **moe)  # fmt: skip


def _hf(vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    return dict(vision_config=vision, text_config=text, image_token_id=151671, image_seq_length=256,
                downsample_ratio=0.5, tie_word_embeddings=False)  # fmt: skip


RELEASES: dict[str, tuple[str, dict[str, Any]]] = {
    "internvl3.5-1b": ("OpenGVLab/InternVL3_5-1B-HF", _hf(VIT_300M, _qwen3(1024, 3072, 28, 16, 8))),
    "internvl3.5-2b": ("OpenGVLab/InternVL3_5-2B-HF", _hf(VIT_300M, _qwen3(2048, 6144, 28, 16, 8))),
    "internvl3.5-4b": ("OpenGVLab/InternVL3_5-4B-HF", _hf(VIT_300M, _qwen3(2560, 9728, 36, 32, 8))),
    "internvl3.5-8b": ("OpenGVLab/InternVL3_5-8B-HF", _hf(VIT_300M, _qwen3(4096, 12288, 36, 32, 8))),
    "internvl3.5-14b": ("OpenGVLab/InternVL3_5-14B-HF", _hf(VIT_300M, _qwen3(5120, 17408, 40, 40, 8))),
    "internvl3.5-38b": ("OpenGVLab/InternVL3_5-38B-HF", _hf(VIT_6B, _qwen3(5120, 25600, 64, 64, 8))),
    "internvl3.5-30b-a3b": ("OpenGVLab/InternVL3_5-30B-A3B-HF", _hf(VIT_300M, _qwen3(
        2048, 6144, 48, 32, 4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        decoder_sparse_step=1))),
}  # fmt: skip


def main() -> None:
    import transformers

    only = set(sys.argv[1:])
    for variant, (repo, kwargs) in RELEASES.items():
        if only and variant not in only:
            continue
        source = (f"{repo} config.json values (OpenGVLab's -HF conversion + the Qwen3 llm_config); transformers "
                  f"{transformers.__version__} InternVLForConditionalGeneration on meta, named as transformers saves "
                  "a loaded checkpoint (docs/fidelity/ref_internvl35_tables.py)")  # fmt: skip
        write(variant, source, "internvl", variant, native_table("InternVLForConditionalGeneration", kwargs))


if __name__ == "__main__":
    main()
