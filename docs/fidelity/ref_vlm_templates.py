"""Reference encodings of one fixed conversation by each family's authors' preprocessing, with our tiny tokenizers.

Run once, outside CI; the printed values are pasted into tests/engines/models/test_vlm_reference_encodings.py:

    .venv/bin/pip install --no-deps --target /tmp/pkgs einops timm tiktoken
    # trees extracted with `git --git-dir=<fetch> show <commit>:<path>`:
    #   hiyouga/LLaMA-Factory@v0.9.4 (src/)            -> /tmp/LLaMA-Factory
    #   haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd (llava/) -> /tmp/LLaVA
    #   OpenGVLab/InternVL@2410d1dbf208f0e799459aff9376e5747dbf41a2 (internvl_chat/internvl/) -> /tmp/InternVL
    #   openai/whisper@v20250625 (whisper/)            -> /tmp/whisper
    PYTHONPATH=/tmp/pkgs:/tmp/LLaMA-Factory/src:/tmp/LLaVA:/tmp/InternVL/internvl_chat:/tmp/whisper:. \
        .venv/bin/python docs/fidelity/ref_vlm_templates.py

What runs (their code, unmodified, on our offline tokenizers; stubbed imports they do not use here: `datasets` and
`torchaudio` for LLaMA-Factory; `cv2`, `imageio`, `decord` for InternVL's dataset module):

* Qwen2-VL: LLaMA-Factory's `SupervisedDatasetProcessor._encode_data_example` with template `qwen2_vl` (its
  Qwen2VLPlugin expands <image> with our tiny Qwen2VLProcessor).
* LLaVA-1.5: LLaVA's `preprocess_v1` (train.py) with conv template `vicuna_v1` and `tokenizer_image_token`. Its
  span arithmetic (`len(...) - 2`, the `legacy` branch) is written for Llama's SentencePiece; on our byte-level
  tokenizer the equivalent is legacy=True (no merge across turn boundaries), set on the tokenizer.
* InternVL: `preprocess_internlm` (template internlm2-chat: the InternVL2 finetune scripts' --conv_style, with a
  <s>-adding tokenizer as InternLM2's), `preprocess_mpt` (Hermes-2) and `preprocess_internvl2_5` (InternVL2.5/3),
  each image 1 tile of 4 <IMG_CONTEXT> tokens; plus `dynamic_preprocess` tile counts for a set of image sizes.
* Whisper: openai/whisper's `get_tokenizer`-equivalent built through its `Tokenizer` class over a tiktoken encoding
  of 256 byte ranks and their special-token list, giving the decoder prompt of a transcription.

Each encoding is printed as the decoded text (special tokens kept) and the label mask as run lengths
[[trained?, count], ...]: with a byte-level tokenizer that pair fixes input_ids and labels exactly.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types
from typing import Any

import numpy as np
import torch
from PIL import Image

IGNORE = -100
QUESTION, ANSWER, FOLLOW_UP, SHORT = "What is in the picture?", "A red square.", "And its size?", "Tiny."


def _stub(*names: str) -> None:
    class _Any(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in names:
        mod = _Any(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules.setdefault(name, mod)


def runs(labels: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for lab in labels:
        trained = int(lab != IGNORE)
        if out and out[-1][0] == trained:
            out[-1][1] += 1
        else:
            out.append([trained, 1])
    return out


def show(name: str, tok: Any, ids: list[int], labels: list[int], image_id: int | None = None) -> None:
    ids = [i for i in ids]
    text = tok.decode([i if i >= 0 else image_id for i in ids], skip_special_tokens=False)
    print(f"{name}_TEXT = {text!r}")
    print(f"{name}_MASK = {runs(labels)}")


def image() -> Image.Image:
    return Image.fromarray(np.full((56, 56, 3), 200, dtype=np.uint8))


def qwen2_vl() -> None:
    _stub("datasets", "torchaudio")
    from flowspeed.engines.models.qwen2_vl import tiny_processor
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import TEMPLATES

    proc = tiny_processor()
    args = types.SimpleNamespace(cutoff_len=4096, train_on_prompt=False, mask_history=False)
    worker = SupervisedDatasetProcessor(template=TEMPLATES["qwen2_vl"], tokenizer=proc.tokenizer, processor=proc,
                                        data_args=args)  # fmt: skip
    prompt = [{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": ANSWER},
              {"role": "user", "content": FOLLOW_UP}]  # fmt: skip
    ids, labels = worker._encode_data_example(prompt, [{"role": "assistant", "content": SHORT}], None, None,
                                              [image()], [], [])  # fmt: skip
    show("QWEN2_VL", proc.tokenizer, ids, labels)


def llava() -> None:
    import transformers
    from flowspeed.engines.models.llava import tiny_tokenizer
    from llava import conversation as conversation_lib
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    # train.py imports the whole model zoo; run only its preprocess_v1, with the globals it reads
    source = open(sys.modules["llava"].__path__[0] + "/train/train.py").read()
    start = source.index("def preprocess_v1(")
    end = source.index("\ndef ", start + 10)
    scope = dict(torch=torch, transformers=transformers, Dict=dict, Sequence=list, IGNORE_INDEX=IGNORE_INDEX,
                 conversation_lib=conversation_lib, tokenizer_image_token=tokenizer_image_token,
                 IS_TOKENIZER_GREATER_THAN_0_14=True)  # fmt: skip
    exec(compile(source[start:end], "llava/train/train.py", "exec"), scope)
    conversation_lib.default_conversation = conversation_lib.conv_templates["vicuna_v1"]
    tok = tiny_tokenizer()
    tok.legacy = True
    sources = [[{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER},
                {"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": SHORT}]]  # fmt: skip
    out = scope["preprocess_v1"](sources, tok, has_image=True)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert IMAGE_TOKEN_INDEX in ids
    show("LLAVA", tok, ids, labels, image_id=tok.convert_tokens_to_ids("<image>"))
    # image_aspect_ratio "pad": their expand2square in the CLIP mean colour, first channel of a 2x5 and a 5x2 image
    from llava.mm_utils import expand2square
    from transformers import CLIPImageProcessor

    fill = tuple(int(x * 255) for x in CLIPImageProcessor().image_mean)
    for h, w in ((2, 5), (5, 2)):
        padded = np.asarray(expand2square(Image.fromarray(np.full((h, w, 3), 7, np.uint8)), fill))
        print(f"LLAVA_PAD_{h}x{w} = {padded[:, :, 0].tolist()}  # fill {fill}")


def _internvl_tokenizer(bos: bool) -> Any:
    from flowspeed.engines.models.internvl import MM_TOKENS, SPECIAL_TOKENS
    from flowspeed.engines.models.tokenizer import byte_level_bpe
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if not bos:
        from flowspeed.engines.models.internvl import tiny_tokenizer

        return tiny_tokenizer()
    raw = byte_level_bpe(head=("<s>",), tail=SPECIAL_TOKENS)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.to_str()), bos_token="<s>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=MM_TOKENS,
                                  model_max_length=8192)  # fmt: skip
    tok.add_bos_token = True  # InternLM2's tokenizer: <s> first
    return tok


def internvl() -> None:
    _stub("cv2", "imageio", "decord")
    from internvl.train import dataset

    sources = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER},
               {"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": SHORT}]  # fmt: skip
    for name, template, fn, bos in (
        ("INTERNVL_INTERNLM2", "internlm2-chat", dataset.preprocess_internlm, True),
        ("INTERNVL_HERMES2", "Hermes-2", dataset.preprocess_mpt, False),
        ("INTERNVL_V25", "internvl2_5", dataset.preprocess_internvl2_5, False),
    ):
        tok = _internvl_tokenizer(bos)
        out = fn(template, [[dict(s) for s in sources]], tok, [4], group_by_length=True, num_image=1)
        show(name, tok, out["input_ids"][0].tolist(), out["labels"][0].tolist())
    sizes = [(56, 56), (130, 40), (40, 130), (112, 56), (100, 100), (300, 60), (57, 111)]
    tiles = [len(dataset.dynamic_preprocess(Image.new("RGB", s), 1, 4, 56, use_thumbnail=True)) for s in sizes]
    print(
        f"INTERNVL_TILES = {dict(zip(sizes, tiles, strict=True))}  # (width, height): tiles, max 4 + thumbnail, 56 px"
    )


def whisper() -> None:
    import importlib.util

    import tiktoken

    # whisper/__init__ imports the model and numba; load only whisper/tokenizer.py
    path = next(p for p in sys.path if p.endswith("whisper")) + "/whisper/tokenizer.py"
    spec = importlib.util.spec_from_file_location("whisper_tokenizer", path)
    wt = importlib.util.module_from_spec(spec)
    sys.modules["whisper_tokenizer"] = wt  # dataclasses look the module up while building the class
    spec.loader.exec_module(wt)

    for num_languages in (99, 100):  # whisper-small .. large-v2, and large-v3 (adds Cantonese)
        # their get_encoding, with 256 byte ranks in place of the vocabulary file
        ranks = {bytes([b]): b for b in range(256)}
        specials = ["<|endoftext|>", "<|startoftranscript|>",
                    *[f"<|{lang}|>" for lang in list(wt.LANGUAGES.keys())[:num_languages]],
                    "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                    "<|notimestamps|>"]  # fmt: skip
        assert inspect.getsource(wt.get_encoding).count('"<|notimestamps|>"') == 1  # the list above is theirs
        enc = tiktoken.Encoding(name="bytes", explicit_n_vocab=256 + len(specials), pat_str=r"[\s\S]",
                                mergeable_ranks=ranks,
                                special_tokens={t: 256 + i for i, t in enumerate(specials)})  # fmt: skip
        tok = wt.Tokenizer(encoding=enc, num_languages=num_languages, language="en", task="transcribe")
        prompt = [enc.decode([t]) for t in tok.sot_sequence_including_notimestamps]
        offsets = [t - tok.sot for t in tok.sot_sequence_including_notimestamps]
        print(f"WHISPER_PROMPT_{num_languages} = {prompt}  # ids - sot: {offsets}, eot - sot: {tok.eot - tok.sot}")


if __name__ == "__main__":
    for part in sys.argv[1:] or ["qwen2_vl", "llava", "internvl", "whisper"]:
        globals()[part]()
