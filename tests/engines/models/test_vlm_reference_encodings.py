"""Chat templates, media placeholders and answer-only labels against the authors' own preprocessing.

One fixed two-turn conversation about one image was encoded once by each family's authors' training code, run
on our offline tiny tokenizers (docs/fidelity/ref_vlm_templates.py, which says which commits and what it stubbed):
LLaMA-Factory v0.9.4's qwen2_vl template (Qwen2-VL), LLaVA's preprocess_v1 with vicuna_v1 (LLaVA-1.5), InternVL's
preprocess_internlm / preprocess_mpt / preprocess_internvl2_5 (InternVL2 with InternLM2, Hermes-2, InternVL2.5/3),
and openai/whisper's Tokenizer (Whisper's decoder prompt). The expected values below are what it printed: the
decoded token sequence and the label mask as run lengths [[trained?, count], ...], which with a byte-level
tokenizer fix input_ids and labels exactly. CI never runs the authors' code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.internvl_remote import TEMPLATES, RemoteInternVLProcessor, encode_remote, image_tiles
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample
from flowspeed.engines.models.tokenizer import byte_level_bpe
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

CHAT = [
    {"role": "user", "content": "What is in the picture?"},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And its size?"},
    {"role": "assistant", "content": "Tiny."},
]
IMAGE = np.full((56, 56, 3), 200, dtype=np.uint8)  # one tile / one 2x2 merged Qwen2-VL grid at the tiny sizes
SAMPLE = SequenceSample(messages=CHAT, images=[IMAGE])
_SYS_V2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_SYS_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_IMG4 = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n"

# ---- printed by docs/fidelity/ref_vlm_templates.py ----------------------------------------------------------------
QWEN2_VL_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    + "<|image_pad|>" * 4
    + "<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n"
    "<|im_start|>user\nAnd its size?<|im_end|>\n<|im_start|>assistant\nTiny.<|im_end|>\n"
)
QWEN2_VL_MASK = [[0, 86], [1, 15], [0, 32], [1, 7]]
LLAVA_TEXT = (
    "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? ASSISTANT: "
    "A red square.</s>USER: And its size? ASSISTANT: Tiny.</s>"
)
LLAVA_MASK = [[0, 198], [1, 15], [0, 30], [1, 7]]
# LLaVA's expand2square(image, CLIP mean * 255) of a 2x5 and a 5x2 image of value 7: first channel
LLAVA_FILL = (122, 116, 104)
LLAVA_PAD = {
    (2, 5): [[122] * 5, [7] * 5, [7] * 5, [122] * 5, [122] * 5],
    (5, 2): [[122, 7, 7, 122, 122]] * 5,
}
_TURNS = (
    "user\n" + _IMG4 + "What is in the picture?<|im_end|>{nl}<|im_start|>assistant\nA red square.<|im_end|>{nl}"
    "<|im_start|>user\nAnd its size?<|im_end|>{nl}<|im_start|>assistant\nTiny.<|im_end|>{nl}"
)
INTERNVL = {  # template: (text, mask)
    "internlm2-chat": (
        "<s><|im_start|>system\n" + _SYS_V2 + "<|im_end|><|im_start|>" + _TURNS.format(nl=""),
        [[0, 215], [1, 14], [0, 31], [1, 6]],
    ),
    "Hermes-2": (
        "<|im_start|>system\n" + _SYS_V2 + "<|im_end|><|im_start|>" + _TURNS.format(nl=""),
        [[0, 214], [1, 14], [0, 31], [1, 6]],
    ),
    "internvl2_5": (
        "<|im_start|>system\n" + _SYS_V25 + "<|im_end|>\n<|im_start|>" + _TURNS.format(nl="\n"),
        [[0, 216], [1, 14], [0, 33], [1, 6], [0, 1]],
    ),
}
# InternVL's dynamic_preprocess(min 1, max 4 tiles, 56 px, thumbnail): (width, height) -> tiles
INTERNVL_TILES = {(56, 56): 1, (130, 40): 4, (40, 130): 4, (112, 56): 3, (100, 100): 5, (300, 60): 5, (57, 111): 3}
# openai/whisper Tokenizer(num_languages=100, language="en", task="transcribe").sot_sequence_including_notimestamps,
# as names and as ids - sot; eot = sot - 1
WHISPER_PROMPT = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
WHISPER_OFFSETS = [0, 1, 102, 106]


def runs(labels: torch.Tensor) -> list[list[int]]:
    out: list[list[int]] = []
    for lab in labels.tolist():
        trained = int(lab != IGNORE_INDEX)
        if out and out[-1][0] == trained:
            out[-1][1] += 1
        else:
            out.append([trained, 1])
    return out


def test_qwen2_vl_matches_llama_factory_qwen2_vl_template() -> None:
    fam = get_family("qwen2_vl")
    from flowspeed.engines.models.qwen2_vl import tiny_processor

    proc = tiny_processor()
    enc = fam.encode_sample(proc, SAMPLE, 4096)
    assert proc.tokenizer.decode(enc["input_ids"]) == QWEN2_VL_TEXT
    assert runs(enc["labels"]) == QWEN2_VL_MASK  # the answer, <|im_end|> and the newline after it


def test_llava_matches_preprocess_v1_with_vicuna_v1() -> None:
    fam = get_family("llava")
    from flowspeed.engines.models.llava import tiny_processor

    proc = tiny_processor()
    enc = fam.encode_sample(proc, SAMPLE, 4096)
    ids, labels = enc["input_ids"], enc["labels"]
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    # LLaVA's code keeps one IMAGE_TOKEN_INDEX that the model widens to 576 features; the processor expands it
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ~((ids[1:] == image_id) & (ids[:-1] == image_id))
    assert int((ids == image_id).sum()) == 16  # (56 / 14)^2 patch features of the tiny tower
    assert proc.tokenizer.decode(ids[first]) == LLAVA_TEXT
    assert runs(labels[first]) == LLAVA_MASK  # " answer</s>" trained, the system prompt and questions not


def test_llava_pads_images_to_square_like_expand2square() -> None:
    from flowspeed.engines.models.llava import square_images, tiny_processor

    for (h, w), expected in LLAVA_PAD.items():
        (padded,) = square_images(tiny_processor(), [np.full((h, w, 3), 7, np.uint8)])
        assert padded[:, :, 0].tolist() == expected
        assert tuple(padded[0, 0] if h < w else padded[0, -1]) == LLAVA_FILL


def test_internvl_native_matches_preprocess_internvl2_5() -> None:
    fam = get_family("internvl")
    from flowspeed.engines.models.internvl import tiny_processor

    proc = tiny_processor()
    enc = fam.encode_sample(proc, SAMPLE, 4096)
    text, mask = INTERNVL["internvl2_5"]
    assert proc.tokenizer.decode(enc["input_ids"]) == text
    assert runs(enc["labels"]) == mask


def _bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny InternVL vocabulary behind a <s> that the tokenizer adds, as InternLM2's does."""
    from flowspeed.engines.models.internvl import MM_TOKENS, SPECIAL_TOKENS

    raw = byte_level_bpe(head=("<s>",), tail=SPECIAL_TOKENS)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.to_str()), bos_token="<s>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=MM_TOKENS,
                                  model_max_length=8192)  # fmt: skip
    tok.add_bos_token = True
    return tok


@pytest.mark.parametrize("template", list(INTERNVL))
def test_internvl_original_layout_matches_the_authors_preprocess(template: str) -> None:
    from flowspeed.engines.models.internvl import tiny_tokenizer

    tok = _bos_tokenizer() if template == "internlm2-chat" else tiny_tokenizer()
    proc = RemoteInternVLProcessor(tokenizer=tok, template=template, system_message=TEMPLATES[template]["system"],
                                   image_size=56, num_image_token=4, max_tiles=4)  # fmt: skip
    enc = encode_remote(proc, SAMPLE)
    text, mask = INTERNVL[template]
    assert tok.decode(enc["input_ids"]) == text
    assert runs(enc["labels"]) == mask


def test_internvl_tiling_matches_dynamic_preprocess() -> None:
    from flowspeed.engines.models.internvl import tiny_processor, tiny_tokenizer

    proc = RemoteInternVLProcessor(tokenizer=tiny_tokenizer(), template="internvl2_5", system_message="",
                                   image_size=56, num_image_token=4, max_tiles=4)  # fmt: skip
    ours = {(w, h): len(image_tiles(np.zeros((h, w, 3), np.uint8), proc, 4)) for w, h in INTERNVL_TILES}
    assert ours == INTERNVL_TILES  # the original-layout path (internvl_remote.tile_grid)
    native = tiny_processor().image_processor  # transformers' GotOcr2ImageProcessor(crop_to_patches, max_patches=4)
    got = {(w, h): int(native(images=[np.zeros((h, w, 3), np.uint8)], return_tensors="pt")["num_patches"][0])
           for w, h in INTERNVL_TILES}  # fmt: skip
    assert got == INTERNVL_TILES


def test_whisper_decoder_prompt_matches_openai_tokenizer() -> None:
    from flowspeed.engines.models.whisper import byte_level_whisper_tokenizer

    tok = byte_level_whisper_tokenizer()
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    ids = tok("hello", split_special_tokens=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:4]) == WHISPER_PROMPT
    assert [i - sot for i in ids[:4]] == WHISPER_OFFSETS and ids[-1] - sot == -1  # <|endoftext|> just before sot
    fam = get_family("whisper")
    proc = fam.load_processor(ModelConfig(family="whisper"))
    labels = fam.encode_sample(proc, SequenceSample(audio=np.zeros(16000, np.float32), text="hello"), 448)["labels"]
    assert labels.tolist() == ids[1:]  # the forward prepends <|startoftranscript|> (decoder_start_token_id)


# OpenGVLab's InternLM2ForCausalLM (modeling_internlm2.py) loaded with OriginalLayoutInternVL.to_original of the
# seeded weights below: last-position logits (first 8 of 64) for input ids 1..10; our Llama text model gave the
# same to 1.7e-6 in that run (docs/fidelity/ref_vlm_tables.py wqkv)
INTERNLM2_LOGITS = [-0.388086, -0.349474, -1.278077, 1.06572, 0.766784, -0.035432, 0.094622, -0.83249]


def test_internvl2_original_layout_computes_what_internlm2_computes() -> None:
    from flowspeed.engines.models.internvl_remote import OriginalLayoutInternVL
    from transformers import InternVLConfig

    from tests.fidelity import seeded_weights

    text = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    model = OriginalLayoutInternVL(InternVLConfig(vision_config=vision, text_config=text, image_token_id=63,
                                                  image_seq_length=1, tie_word_embeddings=False))  # fmt: skip
    state = seeded_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed=17)
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.arange(1, 11)[None]).logits[0, -1, :8]
    # float32 sums over 32-64 terms of O(1) values: 1e-5 is ~10x the difference seen between the two codes
    torch.testing.assert_close(logits, torch.tensor(INTERNLM2_LOGITS), rtol=0, atol=1e-5)
    # and the fused layout is the one their attention splits: (kv groups, q heads per group + 2, head_dim, hidden)
    wqkv = model.to_original(state)["language_model.model.layers.0.attention.wqkv.weight"].reshape(2, 4, 8, 32)
    stem = "model.language_model.layers.0.self_attn."
    assert torch.equal(wqkv[:, :2].reshape(32, 32), state[stem + "q_proj.weight"])
    assert torch.equal(wqkv[:, 2].reshape(16, 32), state[stem + "k_proj.weight"])
    assert torch.equal(wqkv[:, 3].reshape(16, 32), state[stem + "v_proj.weight"])
