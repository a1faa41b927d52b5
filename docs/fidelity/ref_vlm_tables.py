"""Fact tables (released key -> shape) for the understanding and speech families' real variants.

Run once, outside CI (writes tests/facts/<name>.json):

    .venv/bin/pip install --no-deps --target /tmp/pkgs einops timm
    git --git-dir=<fetch of github:OpenGVLab/InternVL> show 2410d1dbf208f0e799459aff9376e5747dbf41a2:<path> ...
        (internvl_chat/internvl/** extracted to /tmp/InternVL/internvl_chat)
    PYTHONPATH=/tmp/pkgs:/tmp/InternVL/internvl_chat:. .venv/bin/python docs/fidelity/ref_vlm_tables.py

Two kinds of sources, neither of them flowspeed's own modules or engines/models/variants.py:

* The original InternVL2 releases (remote code): OpenGVLab/InternVL@2410d1db internvl_chat/internvl/model/
  internvl_chat/modeling_internvl_chat.py `InternVLChatModel` (with their modeling_intern_vit.py and
  internlm2/modeling_internlm2.py), built on the meta device from the released config.json values below. Its
  state-dict names ARE the released checkpoint's names (the release is that module's save_pretrained).
* transformers-native releases (Qwen2-VL, Qwen2.5-VL, llava-hf, InternVL3-hf, Whisper): the transformers class built
  from the released config.json values below, named as transformers writes a checkpoint it loaded: its conversion
  mapping reversed, including the scoped prefix changes of nested towers (llava-hf's CLIP tower is saved as
  `vision_tower.vision_model.*`), less the tied copies save_pretrained drops.

Prints one line per table: file, key count, parameter count.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

FACTS = Path(__file__).resolve().parents[2] / "tests" / "facts"
INTERNVL_TAG = "OpenGVLab/InternVL@2410d1dbf208f0e799459aff9376e5747dbf41a2"

# ---- released config.json values --------------------------------------------------------------------------------
# InternViT-300M-448px (InternVL2-2B/8B vision_config) and InternViT-6B-448px-V1-5 (InternVL2-26B/76B; its own
# config.json: hidden 3200, intermediate 12800, 45 layers, 25 heads, qkv_bias false, qk_normalization true).
VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=448, patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                layer_norm_eps=1e-6, initializer_factor=0.1)  # fmt: skip
VIT_6B = dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
              image_size=448, patch_size=14, qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
              layer_norm_eps=1e-6, initializer_factor=0.1)  # fmt: skip


def _lm(arch: str, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    # vocab: the base LLM's plus the 9 tokens internvl_chat_finetune.py adds (<img>, </img>, <IMG_CONTEXT>,
    # <quad>, </quad>, <ref>, </ref>, <box>, </box>): internlm2 92544 + 9, Llama-3 128256 + 9.
    return dict(architectures=[arch], vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, bias=False,
                tie_word_embeddings=False, rope_theta=1000000, max_position_embeddings=32768,
                attn_implementation="eager")  # fmt: skip


# OpenGVLab/InternVL2-{2B,8B,26B} and InternVL2-Llama3-76B config.json (llm_config of internlm2-chat-1_8b,
# internlm2_5-7b-chat, internlm2-chat-20b, Hermes-2-Theta-Llama-3-70B; the InternVL README's model table names them).
INTERNVL2 = {
    "internvl2-2b": ("OpenGVLab/InternVL2-2B", VIT_300M, _lm("InternLM2ForCausalLM", 92553, 2048, 8192, 24, 16, 8)),
    "internvl2-8b": ("OpenGVLab/InternVL2-8B", VIT_300M, _lm("InternLM2ForCausalLM", 92553, 4096, 14336, 32, 32, 8)),
    "internvl2-26b": ("OpenGVLab/InternVL2-26B", VIT_6B, _lm("InternLM2ForCausalLM", 92553, 6144, 16384, 48, 48, 8)),
    "internvl2-76b": (
        "OpenGVLab/InternVL2-Llama3-76B",
        VIT_6B,
        _lm("LlamaForCausalLM", 128265, 8192, 28672, 80, 64, 8),
    ),
}
_QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, in_channels=3)  # fmt: skip


def _qwen2_vl(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, tied: bool) -> dict[str, Any]:
    # Qwen/Qwen2-VL-{2B,7B,72B}-Instruct config.json (transformers 4.45 flat layout: the text fields at top level)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)  # fmt: skip
    return dict(text_config=text, vision_config=dict(_QWEN2_VISION, hidden_size=hidden), tie_word_embeddings=tied)


# Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct config.json: the same vision tower in all four (SwiGLU 3420, window
# attention but in blocks 7/15/23/31), its merger projecting to the language model's width (`out_hidden_size`)
_QWEN2_5_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3)  # fmt: skip


def _qwen2_5_vl(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, tied: bool) -> dict[str, Any]:
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)  # fmt: skip
    return dict(text_config=text, vision_config=dict(_QWEN2_5_VISION, out_hidden_size=hidden), tie_word_embeddings=tied)


_CLIP_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)  # fmt: skip


def _llava(hidden: int, ffn: int, layers: int, heads: int) -> dict[str, Any]:
    # llava-hf/llava-1.5-{7b,13b}-hf config.json: CLIP ViT-L/14-336 + Vicuna, vocab 32064 (32000 + <image> + pad)
    text = dict(model_type="llama", vocab_size=32064, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads)  # fmt: skip
    return dict(vision_config=_CLIP_336, text_config=text, image_token_index=32000, vision_feature_layer=-2)


def _whisper(vocab: int, mels: int, width: int, layers: int, heads: int) -> dict[str, Any]:
    # openai/whisper-{small,large-v3} config.json
    return dict(vocab_size=vocab, num_mel_bins=mels, d_model=width, encoder_layers=layers, decoder_layers=layers,
                encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * width,
                decoder_ffn_dim=4 * width, max_source_positions=1500, max_target_positions=448)  # fmt: skip


# OpenGVLab/InternVL3-1B-hf config.json
INTERNVL3_1B_HF = dict(
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                       layer_scale_init_value=0.1, use_mean_pooling=True),
    text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False),
    image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)  # fmt: skip

NATIVE: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # variant: (family, transformers class, config kwargs, released repo)
    "qwen2-vl-2b": ("qwen2_vl", "Qwen2VLForConditionalGeneration",
                    _qwen2_vl(151936, 1536, 8960, 28, 12, 2, tied=True), "Qwen/Qwen2-VL-2B-Instruct"),
    "qwen2-vl-7b": ("qwen2_vl", "Qwen2VLForConditionalGeneration",
                    _qwen2_vl(152064, 3584, 18944, 28, 28, 4, tied=False), "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2-vl-72b": ("qwen2_vl", "Qwen2VLForConditionalGeneration",
                     _qwen2_vl(152064, 8192, 29568, 80, 64, 8, tied=False), "Qwen/Qwen2-VL-72B-Instruct"),
    "qwen2.5-vl-3b": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                      _qwen2_5_vl(151936, 2048, 11008, 36, 16, 2, tied=True), "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2.5-vl-7b": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                      _qwen2_5_vl(152064, 3584, 18944, 28, 28, 4, tied=False), "Qwen/Qwen2.5-VL-7B-Instruct"),
    "qwen2.5-vl-32b": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                       _qwen2_5_vl(152064, 5120, 27648, 64, 40, 8, tied=False), "Qwen/Qwen2.5-VL-32B-Instruct"),
    "qwen2.5-vl-72b": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                       _qwen2_5_vl(152064, 8192, 29568, 80, 64, 8, tied=False), "Qwen/Qwen2.5-VL-72B-Instruct"),
    "llava-1.5-7b": ("llava", "LlavaForConditionalGeneration", _llava(4096, 11008, 32, 32),
                     "llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": ("llava", "LlavaForConditionalGeneration", _llava(5120, 13824, 40, 40),
                      "llava-hf/llava-1.5-13b-hf"),
    "internvl3-1b": ("internvl", "InternVLForConditionalGeneration", INTERNVL3_1B_HF, "OpenGVLab/InternVL3-1B-hf"),
    "whisper-small": ("whisper", "WhisperForConditionalGeneration", _whisper(51865, 80, 768, 12, 12),
                      "openai/whisper-small"),
    "whisper-large-v3": ("whisper", "WhisperForConditionalGeneration", _whisper(51866, 128, 1280, 32, 20),
                         "openai/whisper-large-v3"),
}  # fmt: skip


def _tied(model: torch.nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    out = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            out.add(name)
        seen.setdefault(id(tensor), name)
    return out


def native_table(cls_name: str, kwargs: dict[str, Any]) -> dict[str, list[int]]:
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange
    from transformers.modeling_utils import revert_weight_conversion

    cls = getattr(transformers, cls_name)
    with torch.device("meta"):
        model = cls(cls.config_class(**kwargs))
    # what from_pretrained attaches when it loads a released file, less the root-level prefix changes a fresh
    # model cannot know about (transformers drops all of them for fresh models; nested towers keep theirs)
    convs = get_model_conversion_mapping(model, add_legacy=False)
    model._weight_conversions = [c for c in convs if not isinstance(c, PrefixChange) or c.scope_prefix]
    tied = _tied(model)
    state = revert_weight_conversion(model, {k: v for k, v in model.state_dict().items() if k not in tied})
    return {k: list(v.shape) for k, v in sorted(state.items())}


def internvl2_table(vision: dict[str, Any], llm: dict[str, Any]) -> dict[str, list[int]]:
    from internvl.model.internvl_chat.configuration_internvl_chat import InternVLChatConfig
    from internvl.model.internvl_chat.modeling_internvl_chat import InternVLChatModel

    config = InternVLChatConfig(vision_config=dict(vision, architectures=["InternVisionModel"]), llm_config=llm,
                                select_layer=-1, force_image_size=448, downsample_ratio=0.5, template="internlm2-chat",
                                dynamic_image_size=True, use_thumbnail=True, ps_version="v2")  # fmt: skip
    rope = config.llm_config.rope_scaling or {"type": None}
    if llm["architectures"] == ["InternLM2ForCausalLM"] and "type" not in rope:
        config.llm_config.rope_scaling = None  # transformers 5 fills a default dict their InternLM2 cannot read
    linspace = torch.linspace  # their drop-path schedule calls .item() on it: keep that one tensor on the CPU
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            model = InternVLChatModel(config, use_flash_attn=False)
    finally:
        torch.linspace = linspace
    return {k: list(v.shape) for k, v in sorted(model.state_dict().items())}


def write(name: str, source: str, family: str, variant: str, keys: dict[str, list[int]]) -> None:
    table = {"source": source, "used_by": [[family, variant, "model"]], "keys": keys}
    path = FACTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=0, sort_keys=False) + "\n")
    tmp.replace(path)
    print(f"{path.name}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} parameters")


def main() -> None:
    only = set(sys.argv[1:])
    for variant, (repo, vision, llm) in INTERNVL2.items():
        if only and variant not in only:
            continue
        source = (f"{INTERNVL_TAG}: internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py "
                  f"InternVLChatModel built on meta from the released {repo} config.json values "
                  "(docs/fidelity/ref_vlm_tables.py)")  # fmt: skip
        write(variant, source, "internvl", variant, internvl2_table(vision, llm))
    for variant, (family, cls_name, kwargs, repo) in NATIVE.items():
        if only and variant not in only:
            continue
        import transformers

        source = (f"{repo} config.json values; transformers {transformers.__version__} {cls_name} on meta, named "
                  "as transformers saves a loaded checkpoint (docs/fidelity/ref_vlm_tables.py)")  # fmt: skip
        write(variant, source, family, variant, native_table(cls_name, kwargs))


def wqkv_forward_check() -> None:
    """InternLM2 (their modeling_internlm2.py) fed `to_original` of seeded weights vs our Llama text model.

    Prints the max |difference| of the logits and the first logits, which
    tests/engines/models/test_vlm_reference_encodings.py holds our side to.
    """
    from flowspeed.engines.models.internvl_remote import OriginalLayoutInternVL
    from internvl.model.internlm2.configuration_internlm2 import InternLM2Config
    from internvl.model.internlm2.modeling_internlm2 import InternLM2ForCausalLM
    from transformers import InternVLConfig

    from tests.fidelity import seeded_weights

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                tie_word_embeddings=False)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    ours = OriginalLayoutInternVL(InternVLConfig(vision_config=vision, text_config=dict(model_type="llama", **text),
                                                 image_token_id=63, image_seq_length=1,
                                                 tie_word_embeddings=False))  # fmt: skip
    state = seeded_weights({k: tuple(v.shape) for k, v in ours.state_dict().items()}, seed=17)
    ours.load_state_dict(state)
    ours.eval()
    config = InternLM2Config(**text, bias=False, attn_implementation="eager")
    config.rope_scaling = None  # transformers 5 fills a default dict their InternLM2 cannot read
    theirs = InternLM2ForCausalLM(config).eval()
    released = ours.to_original(state)
    missing = theirs.load_state_dict(
        {k.removeprefix("language_model."): v for k, v in released.items() if k.startswith("language_model.")},
        strict=False,
    )
    assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys), missing
    ids = torch.arange(1, 11)[None]
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = theirs(input_ids=ids).logits
    print(f"INTERNLM2_MAX_DIFF = {float((a - b).abs().max()):.3e}")
    print(f"INTERNLM2_LOGITS = {[round(float(x), 6) for x in b[0, -1, :8]]}  # last position, first 8 of 64")


if __name__ == "__main__":
    wqkv_forward_check() if sys.argv[1:] == ["wqkv"] else main()
