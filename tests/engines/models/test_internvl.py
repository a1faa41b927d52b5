"""InternVL family on its tiny preset: labels, tiles, training signal, export, inference and LoRA."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import flowspeed.engines.models.internvl  # noqa: F401  (registers the family)
import numpy as np
import pytest
import torch
from flowspeed.configs import ComponentConfig, LoraConfig, ModelConfig
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter, merge, save_adapter

FAM = get_family("internvl")
CFG = ModelConfig(family="internvl", max_text_length=512)  # the default system turn is ~150 byte tokens
RNG = np.random.default_rng(0)
IMAGE_CHAT = SequenceSample(
    messages=[
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Top left."},
    ],
    images=[RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)],  # near-square: one 56-px tile, 4 tokens
)
VIDEO_CHAT = SequenceSample(
    messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Does it move?"},
        {"role": "assistant", "content": "Yes, to the right."},
    ],
    videos=[RNG.integers(0, 256, (3, 30, 30, 3), dtype=np.uint8)],  # 3 frames: one tile each
)


@pytest.fixture(scope="module")
def processor():
    return FAM.load_processor(CFG)


@pytest.fixture(scope="module")
def image_token_id() -> int:
    return FAM.load_model(CFG).config.image_token_id


def answer_spans(tokenizer, enc: dict[str, torch.Tensor]) -> list[str]:
    """Decoded runs of labelled tokens, one per assistant answer."""
    ids, labels = enc["input_ids"], enc["labels"]
    runs: list[list[int]] = []
    for i in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tokenizer.decode(ids[r]) for r in runs]


def test_labels_cover_exactly_the_answers_of_an_image_chat(processor, image_token_id: int) -> None:
    enc = FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)
    n = enc["input_ids"].shape[0]
    assert enc["labels"].shape == enc["attention_mask"].shape == (n,)
    labelled = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][labelled], enc["input_ids"][labelled])
    assert answer_spans(processor.tokenizer, enc) == ["A red circle.<|im_end|>", "Top left.<|im_end|>"]
    assert enc["pixel_values"].shape == (1, 3, 56, 56)
    assert (enc["input_ids"] == image_token_id).sum() == 4  # (56/14)^2 patches, pixel-shuffled 0.5
    text = processor.tokenizer.decode(enc["input_ids"])
    # preprocess_internvl2_5's default system turn, then the image block (test_vlm_reference_encodings.py)
    assert text.startswith("<|im_start|>system\n你是书生·万象")
    assert "<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is" in text

    wide = SequenceSample(messages=IMAGE_CHAT.messages, images=[RNG.integers(0, 256, (40, 130, 3), dtype=np.uint8)])
    enc = FAM.encode_sample(processor, wide, CFG.max_text_length)
    assert enc["pixel_values"].shape == (4, 3, 56, 56)  # 3 tiles across + the thumbnail
    assert (enc["input_ids"] == image_token_id).sum() == 4 * 4


def test_video_chat_and_unusable_samples(processor, image_token_id: int) -> None:
    enc = FAM.encode_sample(processor, VIDEO_CHAT, CFG.max_text_length)
    assert answer_spans(processor.tokenizer, enc) == ["Yes, to the right.<|im_end|>"]
    assert enc["pixel_values"].shape == (3, 3, 56, 56)  # frames become tiles
    assert (enc["input_ids"] == image_token_id).sum() == 3 * 4
    assert "Frame3: <img>" in processor.tokenizer.decode(enc["input_ids"])
    with pytest.raises(ValueError, match="no assistant turn"):
        FAM.encode_sample(processor, SequenceSample(messages=[{"role": "user", "content": "hi"}]), 256)
    with pytest.raises(ValueError, match="model.max_text_length=16"):
        FAM.encode_sample(processor, IMAGE_CHAT, 16)
    two = SequenceSample(messages=VIDEO_CHAT.messages, videos=[VIDEO_CHAT.videos[0], VIDEO_CHAT.videos[0][:2]])
    with pytest.raises(ValueError, match="same frame count"):
        FAM.encode_sample(processor, two, 256)


def test_collate_pads_tokens_and_concatenates_tiles(processor) -> None:
    a, b = (FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT))
    batch = FAM.collate([a, b])
    longest = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = 0 if len(a["input_ids"]) < longest else 1
    assert (batch["labels"][short, -1] == IGNORE_INDEX) and (batch["attention_mask"][short, -1] == 0)
    assert batch["pixel_values"].shape == (1 + 3, 3, 56, 56)


def test_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(processor, tmp_path: Path) -> None:
    """Labels, collate, loss, export and the respond prompt agree: a memorised batch is answered back."""
    model = FAM.load_model(CFG).train()
    batch = FAM.collate([FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = FAM.training_loss(model, None, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(263): a random init knows nothing
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2

    FAM.save_pretrained(tmp_path, CFG, model.eval())
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]  # batched, left-padded, each after its own media


def test_export_reloads_identically_and_responds(processor, tmp_path: Path) -> None:
    model = FAM.load_model(CFG).eval()
    FAM.save_pretrained(tmp_path, CFG, model)
    loaded_cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path)))
    reloaded = FAM.load_model(loaded_cfg).eval()
    reproc = FAM.load_processor(loaded_cfg)
    batch = FAM.collate([FAM.encode_sample(reproc, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    ours = FAM.collate([FAM.encode_sample(processor, s, CFG.max_text_length) for s in (IMAGE_CHAT, VIDEO_CHAT)])
    assert all(torch.equal(batch[k], ours[k]) for k in ("input_ids", "pixel_values"))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    prompt_only = SequenceSample(messages=[{"role": "user", "content": "Say hi."}])
    answers = FAM.respond(tmp_path, [IMAGE_CHAT, VIDEO_CHAT, prompt_only], max_new_tokens=4, device=torch.device("cpu"))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_missing_pretrained_directory_says_which_key_to_fix(tmp_path: Path) -> None:
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="model.transformer.pretrained"):
        FAM.load_model(cfg)


def test_original_remote_code_checkpoints_are_refused_with_the_conversion(tmp_path: Path) -> None:
    """An OpenGVLab InternVL2-style directory: its config points at its own modelling code."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
    }))  # fmt: skip
    (tmp_path / "modeling_internvl_chat.py").write_text("raise SystemExit('remote code ran')\n")
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path)))
    for load in (FAM.load_model, FAM.load_processor):
        with pytest.raises(ValueError, match="convert_internvl_weights_to_hf.py") as err:
            load(cfg)
        assert "InternVL3-1B-hf" in str(err.value) and "model.transformer.pretrained" in str(err.value)
    hub = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained="OpenGVLab/InternVL2-1B"))
    with pytest.raises(ValueError, match="no -hf suffix"):  # refused by name, before any download
        FAM.load_model(hub)


def test_lora_adapts_only_the_language_model_reloads_and_merges(processor, tmp_path: Path) -> None:
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(FAM.load_model(CFG), lora, FAM.lora_targets, FAM.lora_exclude).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # layers x (q, k, v, o) x (A, B)
    assert all("lora_" in n and n.startswith("model.language_model.layers.") for n in trainable)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    batch = FAM.collate([FAM.encode_sample(processor, IMAGE_CHAT, CFG.max_text_length)])
    batch.pop("labels")
    with torch.no_grad():
        adapted = model(**batch).logits
        assert not torch.allclose(adapted, FAM.load_model(CFG).eval()(**batch).logits)
    save_adapter(model, tmp_path / "lora", "internvl/tiny")
    again = apply_lora(FAM.load_model(CFG), lora, FAM.lora_targets, FAM.lora_exclude).eval()
    load_adapter(again, tmp_path / "lora")
    merged = merge(model)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, adapted)
        assert torch.allclose(merged(**batch).logits, adapted, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_internvl3_1b_variant_is_within_one_percent_of_published() -> None:
    from flowspeed.engines.models.variants import family_summary, get_variant, parameter_counts

    counts = parameter_counts("internvl", "internvl3-1b")
    assert counts["components"]["model"] == pytest.approx(get_variant("internvl", "internvl3-1b").published, rel=0.01)
    assert family_summary("internvl")["tasks"] == ["sft(image+video)", "pretrain", "finetune", "lora"]


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Prep, training and inference tokenize in different processes: ids must not follow hash seeds."""
    code = (
        "from flowspeed.engines.models.internvl import tiny_tokenizer as t; "
        "print(t()('<|im_start|>user\\n<img><IMG_CONTEXT></img>a red circle<|im_end|>').input_ids)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        for seed in (1, 2)
    ]
    outs = {p.communicate(timeout=120)[0] for p in procs}
    assert len(outs) == 1
    ids = ast.literal_eval(outs.pop().strip())
    assert ids[0] == 257 and ids[6:9] == [259, 261, 260]  # <|im_start|> "user\n" <img> <IMG_CONTEXT> </img>


# ---- original (custom-code) checkpoints, opted in with model.transformer.trust_remote_code ----------
REMOTE_CONFIG_PY = """
from transformers import PretrainedConfig


class TinyChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vocab_size=263, hidden_size=32, template="internvl2_5", force_image_size=56,
                 downsample_ratio=0.5, vision_config=None, **kwargs):
        self.vocab_size, self.hidden_size, self.template = vocab_size, hidden_size, template
        self.force_image_size, self.downsample_ratio = force_image_size, downsample_ratio
        self.vision_config = vision_config or {"image_size": 56, "patch_size": 14}
        super().__init__(**kwargs)
"""
# Our own toy with InternVLChatModel's interface: tile features scattered onto <IMG_CONTEXT> ids,
# image_flags selecting tiles, generate() returning only the new tokens. Importing it leaves a mark.
REMOTE_MODELING_PY = """
import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_chat import TinyChatConfig

Path(os.environ["REMOTE_CODE_MARK"]).write_text("remote code ran")


class TinyChatModel(PreTrainedModel):
    config_class = TinyChatConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        d, side = config.hidden_size, config.force_image_size // config.vision_config["patch_size"]
        self.grid = int(side * config.downsample_ratio)
        self.num_image_token = self.grid**2
        self.vision = nn.Linear(3, d)
        self.embed = nn.Embedding(config.vocab_size, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, config.vocab_size)
        self.img_context_token_id = None
        self.post_init()

    def _embeds(self, pixel_values, input_ids, image_flags):
        x = self.embed(input_ids)
        if pixel_values is None:
            return x
        feats = self.vision(nn.functional.adaptive_avg_pool2d(pixel_values, self.grid).flatten(2).transpose(1, 2))
        if image_flags is not None:
            feats = feats[image_flags.squeeze(-1) == 1]
        selected = input_ids == self.img_context_token_id
        x = x.clone()
        x[selected] = feats.reshape(-1, x.shape[-1]).to(x.dtype)
        return x

    def _logits(self, x, attention_mask):
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), -1e9), 1)[None].repeat(x.shape[0], 1, 1)
        if attention_mask is not None:
            mask = mask + (1 - attention_mask[:, None, :].float()) * -1e9
        return self.head(self.block(x, src_mask=mask.repeat_interleave(2, 0)))

    def forward(self, pixel_values, input_ids=None, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, labels=None, **kwargs):
        assert self.img_context_token_id is not None
        logits = self._logits(self._embeds(pixel_values, input_ids, image_flags), attention_mask)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens=8,
                 eos_token_id=None, pad_token_id=0, **kwargs):
        assert self.img_context_token_id is not None
        x = self._embeds(pixel_values, input_ids, None)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        out, done = [], torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = self._logits(x, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt)
            done |= nxt == eos_token_id
            if done.all():
                break
            x = torch.cat([x, self.embed(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return torch.stack(out, 1)
"""


def write_remote_checkpoint(root: Path, template: str = "internvl2_5") -> Path:
    from flowspeed.engines.models.internvl import tiny_tokenizer

    root.mkdir()
    (root / "configuration_tiny_chat.py").write_text(REMOTE_CONFIG_PY)
    (root / "modeling_tiny_chat.py").write_text(REMOTE_MODELING_PY)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["TinyChatModel"], "model_type": "internvl_chat", "template": template,
        "auto_map": {"AutoConfig": "configuration_tiny_chat.TinyChatConfig",
                     "AutoModel": "modeling_tiny_chat.TinyChatModel"},
        "vocab_size": 263, "hidden_size": 32, "force_image_size": 56, "downsample_ratio": 0.5,
        "vision_config": {"image_size": 56, "patch_size": 14}, "max_dynamic_patch": 4, "use_thumbnail": True,
    }))  # fmt: skip
    tiny_tokenizer().save_pretrained(root)
    return root


@pytest.fixture
def remote_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REMOTE_CODE_MARK", str(tmp_path / "remote_code_ran"))
    return write_remote_checkpoint(tmp_path / "InternVL2-toy")


def _weights(ckpt: Path) -> None:
    """Give the toy checkpoint random weights (runs its code, so only after the refusal checks)."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(ckpt)


def test_original_checkpoint_code_never_runs_without_the_local_opt_in(remote_ckpt: Path) -> None:
    mark = remote_ckpt.parent / "remote_code_ran"
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(remote_ckpt)))
    for load in (FAM.load_model, FAM.load_processor):
        with pytest.raises(ValueError, match="trust_remote_code: true") as err:
            load(cfg)
        assert "convert_internvl_weights_to_hf.py" in str(err.value) and "local directory" in str(err.value)
    hub = ComponentConfig(pretrained="OpenGVLab/InternVL2-1B", trust_remote_code=True)
    with pytest.raises(ValueError, match="local directories only"):  # a hub id: never, opt-in or not
        FAM.load_model(ModelConfig(family="internvl", transformer=hub))
    assert not mark.exists()  # the planted modeling file was never imported
    _weights(remote_ckpt)
    mark.unlink()
    with pytest.raises(ValueError, match="flowspeed_trust_remote_code.json"):  # not an opted-in export
        FAM.respond(remote_ckpt, [IMAGE_CHAT], max_new_tokens=2, device=torch.device("cpu"))
    assert not mark.exists()
    odd = write_remote_checkpoint(remote_ckpt.parent / "phi3", template="phi3-chat")
    with pytest.raises(ValueError, match="supported: Hermes-2, internlm2-chat, internvl2_5"):
        FAM.load_processor(
            ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(odd), trust_remote_code=True))
        )


@pytest.mark.parametrize("template", ["internvl2_5", "Hermes-2"])
def test_opted_in_original_checkpoint_encodes_the_original_layout(tmp_path: Path, monkeypatch, template) -> None:  # noqa: ANN001
    monkeypatch.setenv("REMOTE_CODE_MARK", str(tmp_path / "remote_code_ran"))
    ckpt = write_remote_checkpoint(tmp_path / "ckpt", template=template)
    cfg = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(ckpt), trust_remote_code=True))
    proc = FAM.load_processor(cfg)
    tok = proc.tokenizer
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    wide = SequenceSample(messages=IMAGE_CHAT.messages, images=[RNG.integers(0, 256, (40, 130, 3), dtype=np.uint8)])
    enc = FAM.encode_sample(proc, wide, 1024)
    assert enc["pixel_values"].shape == (4, 3, 56, 56)  # 3x1 grid of 56-px tiles + the thumbnail
    assert torch.equal(enc["image_flags"], torch.ones(4, dtype=torch.long))
    assert (enc["input_ids"] == ctx).sum() == 4 * 4  # (56/14)^2 * 0.5^2 tokens a tile
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert enc["pixel_values"].amin() >= ((0 - mean) / std).min() - 1e-5  # ImageNet-normalised
    assert enc["pixel_values"].amax() <= ((1 - mean) / std).max() + 1e-5
    text = tok.decode(enc["input_ids"])
    sep = "<|im_end|>\n" if template == "internvl2_5" else "<|im_end|>"
    assert text.startswith("<|im_start|>system\n你是")  # the template's default system turn (Chinese: ~150 byte tokens)
    assert sep + "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 16 + "</img>\nWhat is" in text
    assert answer_spans(tok, enc) == ["A red circle.<|im_end|>", "Top left.<|im_end|>"]
    video = FAM.encode_sample(proc, VIDEO_CHAT, 1024)
    assert video["pixel_values"].shape == (3, 3, 56, 56) and (video["input_ids"] == ctx).sum() == 3 * 4
    vtext = tok.decode(video["input_ids"])
    assert vtext.startswith("<|im_start|>system\nAnswer briefly.") and "Frame-3: <img>" in vtext
    text_only = FAM.encode_sample(proc, SequenceSample(messages=IMAGE_CHAT.messages[:2]), 1024)
    assert torch.equal(text_only["image_flags"], torch.zeros(1, dtype=torch.long))  # a blank tile, unused


def test_opted_in_original_checkpoint_trains_exports_and_responds(remote_ckpt: Path, tmp_path: Path) -> None:
    _weights(remote_ckpt)
    cfg = ModelConfig(family="internvl", max_text_length=1024,
                      transformer=ComponentConfig(pretrained=str(remote_ckpt), trust_remote_code=True))  # fmt: skip
    model, proc = FAM.load_model(cfg).train(), FAM.load_processor(cfg)
    assert type(model).__name__ == "TinyChatModel" and model.img_context_token_id == 261
    samples = (IMAGE_CHAT, VIDEO_CHAT, SequenceSample(messages=IMAGE_CHAT.messages[:2]))
    batch = FAM.collate([FAM.encode_sample(proc, s, 1024) for s in samples])
    assert batch["image_flags"].tolist() == [1] + [1] * 3 + [0] and batch["pixel_values"].shape[0] == 5
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = FAM.training_loss(model, None, batch, torch.Generator())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]

    export = tmp_path / "final"
    FAM.save_pretrained(export, cfg, model.eval())
    assert (export / "modeling_tiny_chat.py").is_file() and (export / "flowspeed_trust_remote_code.json").is_file()
    answers = FAM.respond(export, list(samples), max_new_tokens=6, device=torch.device("cpu"))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


# ---- InternVL3.5 (OpenGVLab/InternVL3_5-*-HF): the same class and processor, a Qwen3 / Qwen3-MoE decoder ----------
CFG35 = ModelConfig(family="internvl", max_text_length=512, transformer=ComponentConfig(preset="tiny-3.5"))
CFG35_MOE = ModelConfig(family="internvl", max_text_length=512, transformer=ComponentConfig(preset="tiny-3.5-moe"))
# The chat template OpenGVLab's -HF conversion writes into every InternVL3_5-*-HF tokenizer except GPT-OSS's
# (their conversion script, quoted on GitHub; transformers' convert_internvl_weights_to_hf.py has the same string
# for InternVL3-hf). ms-swift drives InternVL3-hf and InternVL3.5-HF with one template (TemplateType.internvl_hf).
RELEASED_CHAT_TEMPLATE_35 = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
# OpenGVLab/InternVL3_5-*-HF vocabulary (Qwen3's specials, then InternVL's; config.json image_token_id 151671)
RELEASED_IDS_35 = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
                   "</think>": 151668, "<img>": 151669, "</img>": 151670, "<IMG_CONTEXT>": 151671}  # fmt: skip
# InternVL2.5/3/3.5's default system message (internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py,
# template internvl2_5), which preprocess_internvl2_5 puts first when a conversation has none
SYSTEM_35 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SHORT_IMAGE_CHAT = SequenceSample(messages=[{"role": "system", "content": "Answer briefly."}, *IMAGE_CHAT.messages],
                                  images=IMAGE_CHAT.images)  # fmt: skip


@pytest.fixture(scope="module")
def processor35():
    return FAM.load_processor(CFG35)


def reference_internvl2_5(tokenizer, sample: SequenceSample, tiles: list[int], per_tile: int) -> tuple[list, list]:
    """The authors' preprocess_internvl2_5 (OpenGVLab/InternVL@2410d1db internvl_chat_gpt_oss/internvl/train/
    dataset.py, the function `--conv_style internvl2_5` selects for every InternVL3.5 SFT script), re-stated: a
    system turn (the sample's or the template's), `<image>` -> <img> + <IMG_CONTEXT> x tokens + </img>, each turn
    tokenized alone; labels are an answer turn less `<|im_start|>assistant\\n` and its final `\\n`."""
    msgs = list(sample.messages)
    system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else SYSTEM_35
    turns = [("system", f"<|im_start|>system\n{system}<|im_end|>\n")]
    images = iter(tiles)
    for i, m in enumerate(msgs):
        text = m["content"]
        if m["role"] == "user" and i == 0:  # LLaVA data: "<image>\n" heads the first question
            text = "".join(f"<img>{'<IMG_CONTEXT>' * per_tile * n}</img>\n" for n in images) + text
        turns.append((m["role"], f"<|im_start|>{m['role']}\n{text}<|im_end|>\n"))
    head = len(tokenizer("<|im_start|>assistant\n").input_ids)
    ids, labels = [], []
    for role, text in turns:
        part = tokenizer(text).input_ids
        ids += part
        labels += [IGNORE_INDEX] * len(part) if role != "assistant" else [IGNORE_INDEX] * head + part[head:-1] + [
            IGNORE_INDEX]  # fmt: skip
    return ids, labels


def test_internvl35_presets_are_qwen3_decoders_with_the_release_vocabulary_order(processor35) -> None:
    for cfg, decoder in ((CFG35, "Qwen3Model"), (CFG35_MOE, "Qwen3MoeModel")):
        model, tok = FAM.load_model(cfg), FAM.load_processor(cfg).tokenizer
        lm = model.model.language_model
        assert type(lm).__name__ == decoder
        attn, text = lm.layers[0].self_attn, model.config.text_config
        assert text.head_dim * text.num_attention_heads != text.hidden_size  # as Qwen3-0.6B: 16 x 128 != 1024
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (text.head_dim,)
        assert not model.config.tie_word_embeddings and model.lm_head.weight is not lm.embed_tokens.weight
        ours = {t: tok.convert_tokens_to_ids(t) for t in RELEASED_IDS_35}
        assert {t: i - ours["<|endoftext|>"] for t, i in ours.items() if t in ("<|im_start|>", "<|im_end|>")} == {
            "<|im_start|>": 1, "<|im_end|>": 2}  # fmt: skip
        released_tail = [RELEASED_IDS_35[t] for t in ("<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>")]
        ours_tail = [ours[t] for t in ("<think>", "</think>", "<img>", "</img>", "<IMG_CONTEXT>")]
        assert np.diff(ours_tail).tolist() == np.diff(released_tail).tolist() == [1, 1, 1, 1]  # same order, adjacent
        assert model.config.image_token_id == ours["<IMG_CONTEXT>"]
        assert tok.convert_tokens_to_ids("<video>") > ours_tail[-1]  # the -HF conversion adds <video> last
        assert model.generation_config.eos_token_id == ours["<|im_end|>"]
    if text.model_type == "qwen3_moe":
        assert lm.layers[0].mlp.experts.gate_up_proj.shape[0] == text.num_experts  # every layer sparse (A3B)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]  # fmt: skip
    for turns, gen in ((chat, False), (chat[:1], True)):
        released = RELEASED_CHAT_TEMPLATE_35
        theirs = processor35.tokenizer.apply_chat_template(turns, chat_template=released, tokenize=False,
                                                           add_generation_prompt=gen)  # fmt: skip
        assert processor35.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen) == theirs


@pytest.mark.parametrize("sample", ["image", "wide", "video", "text"])
def test_internvl35_ids_and_labels_equal_the_authors_preprocess_internvl2_5(processor35, sample: str) -> None:
    """Placeholder expansion (tiles x 4 tokens, a thumbnail after a grid, one tile per frame) and answer-only
    masking, token for token against the authors' function."""
    tok = processor35.tokenizer
    chats = {"image": (IMAGE_CHAT, [1]),
             "wide": (SequenceSample(messages=IMAGE_CHAT.messages, images=[RNG.integers(0, 256, (40, 130, 3),
                                                                                         dtype=np.uint8)]), [4]),
             "video": (VIDEO_CHAT, None), "text": (SequenceSample(messages=IMAGE_CHAT.messages), [])}  # fmt: skip
    s, tiles = chats[sample]
    enc = FAM.encode_sample(processor35, s, CFG35.max_text_length)
    if sample == "video":  # InternVL's video prompt: "Frame{i}: <img>...</img>" per frame, one tile each
        frames = "\n".join(f"Frame{i}: <img>{'<IMG_CONTEXT>' * 4}</img>" for i in (1, 2, 3))
        ids, labels = reference_internvl2_5(tok, s, [], 4)
        want = tok.decode(ids).replace("<|im_start|>user\n", f"<|im_start|>user\n{frames}\n", 1)
        assert tok.decode(enc["input_ids"]) == want
        assert enc["pixel_values"].shape == (3, 3, 56, 56)
        assert answer_spans(tok, enc) == ["Yes, to the right.<|im_end|>"]
        return
    ids, labels = reference_internvl2_5(tok, s, tiles, 4)
    assert enc["input_ids"].tolist() == ids and enc["labels"].tolist() == labels
    assert enc["attention_mask"].tolist() == [1] * len(ids)
    assert ("pixel_values" in enc) == bool(tiles) and (not tiles or enc["pixel_values"].shape == (tiles[0], 3, 56, 56))


def _train_35(cfg: ModelConfig, steps: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[float]]:
    proc = FAM.load_processor(cfg)
    model = FAM.load_model(cfg).train()
    batch = FAM.collate([FAM.encode_sample(proc, s, cfg.max_text_length) for s in (SHORT_IMAGE_CHAT, VIDEO_CHAT)])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = FAM.training_loss(model, None, batch, torch.Generator())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(265): a random init knows nothing
    return model.eval(), batch, losses


def test_internvl35_tiny_preset_learns_a_fixed_batch_and_answers_from_its_export(tmp_path: Path) -> None:
    model, _, losses = _train_35(CFG35, 40)
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2
    FAM.save_pretrained(tmp_path, CFG35, model)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["model_type"] == "qwen3"
    answers = FAM.respond(tmp_path, [SHORT_IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]  # batched, left-padded, each after its own media


def test_internvl35_moe_preset_learns_answers_and_its_export_reloads_identically(tmp_path: Path) -> None:
    """Qwen3-MoE inside transformers' InternVL class (InternVL3.5-30B-A3B's decoder): trains, exports, reloads."""
    model, batch, losses = _train_35(CFG35_MOE, 60)  # routing makes it slower to memorise than the dense preset
    assert losses[19] < 0.5 * losses[0] and losses[-1] < 0.2
    FAM.save_pretrained(tmp_path, CFG35_MOE, model)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["model_type"] == "qwen3_moe"
    reloaded = FAM.load_model(ModelConfig(family="internvl", transformer=ComponentConfig(pretrained=str(tmp_path))))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded.eval()(**batch).logits)
    answers = FAM.respond(tmp_path, [SHORT_IMAGE_CHAT, VIDEO_CHAT], max_new_tokens=24, device=torch.device("cpu"))
    assert answers == ["Top left.", "Yes, to the right."]


def test_internvl35_lora_export_loads_with_peft_like_the_merged_export(tmp_path: Path) -> None:
    """The run's export path (engines/export.py): final/lora in peft's format, final/ the merged model; peft's
    `PeftModel.from_pretrained` on the base gives the merged export's logits (cf. test_lora_interop.py)."""
    from flowspeed.configs import PipelineConfig
    from flowspeed.engines.export import export_weights, plain_model
    from peft import PeftModel

    cfg = PipelineConfig.model_validate({
        "workdir": str(tmp_path), "model": {"family": "internvl", "transformer": {"preset": "tiny-3.5"}},
        "train": {"lora": {"enabled": True, "rank": 4, "alpha": 8.0}}})  # fmt: skip
    trained = plain_model(FAM, cfg, {})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    final = export_weights(FAM, cfg, {}, trained.state_dict(), tmp_path / "final")
    written = json.loads((final / "lora" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == "internvl/tiny-3.5"
    assert sorted(written["target_modules"]) == sorted(FAM.lora_targets)
    proc = FAM.load_processor(cfg.model)
    batch = FAM.collate([FAM.encode_sample(proc, SHORT_IMAGE_CHAT, 512)])
    batch.pop("labels")
    merged = FAM.load_model(cfg.model.model_copy(update={"transformer": ComponentConfig(pretrained=str(final))}))
    peft_model = PeftModel.from_pretrained(FAM.load_model(cfg.model), final / "lora").eval()
    with torch.no_grad():
        base, ours, theirs = (m.eval()(**batch).logits for m in (FAM.load_model(cfg.model), merged, peft_model))
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    lora_layers = {n.split(".self_attn.")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert lora_layers == {f"base_model.model.model.language_model.layers.{i}" for i in (0, 1)}  # not the InternViT


def test_internvl35_variants_match_the_released_totals() -> None:
    from flowspeed.engines.models.variants import build_on_meta, get_variant, parameter_counts

    sizes = ("1b", "2b", "4b", "8b", "14b", "38b", "30b-a3b")
    for name in (f"internvl3.5-{size}" for size in sizes):
        counts = parameter_counts("internvl", name)
        assert counts["components"]["model"] == pytest.approx(get_variant("internvl", name).published, rel=0.01)
    # InternVL3_5-1B-HF's stored checkpoint, split as its authors' modules split it (quoted on GitHub)
    model = build_on_meta("internvl", "internvl3.5-1b")["model"]
    parts = [
        sum(p.numel() for p in m.parameters())
        for m in (model.model.vision_tower, model.model.language_model, model.model.multi_modal_projector)
    ]
    assert [parts[0], parts[1] + model.lm_head.weight.numel(), parts[2]] == [304_012_288, 751_632_384, 5_253_120]
    assert model.config.image_token_id == RELEASED_IDS_35["<IMG_CONTEXT>"]


def test_internvl35_original_releases_are_refused_by_name() -> None:
    hub = ModelConfig(family="internvl", transformer=ComponentConfig(pretrained="OpenGVLab/InternVL3_5-8B"))
    with pytest.raises(ValueError, match="no -hf suffix") as err:  # before any download
        FAM.load_model(hub)
    assert "OpenGVLab/InternVL3_5-8B-HF" in str(err.value)


@pytest.mark.parametrize("cfg", [CFG35, CFG35_MOE], ids=["tiny-3.5", "tiny-3.5-moe"])
def test_internvl35_packed_samples_give_the_padded_batch_loss_and_gradients(cfg: ModelConfig) -> None:
    """encode_sample's per-sample tensors pack into one row (train.packing): Qwen3 / Qwen3-MoE attention stays
    inside each sample, so loss and gradients equal the padded batch's (images with tiles and a video mixed)."""
    proc, model = FAM.load_processor(cfg), FAM.load_model(cfg).train()
    wide = SequenceSample(
        messages=SHORT_IMAGE_CHAT.messages, images=[RNG.integers(0, 256, (40, 130, 3), dtype=np.uint8)]
    )
    items = [FAM.encode_sample(proc, s, cfg.max_text_length) for s in (wide, VIDEO_CHAT)]
    grads, losses = [], []
    for batch in (FAM.collate(items), FAM.pack(items)):
        loss = FAM.training_loss(model, None, batch, torch.Generator())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
    assert FAM.pack(items)["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=0, msg=name)


def test_internvl35_moe_loss_adds_the_router_balancing_loss_as_qwen3_moe_does() -> None:
    """The authors train InternVL3.5-30B-A3B with llm_config.output_router_logits (their InternVLChatModel adds
    router_aux_loss_coef x load_balancing_loss_func); transformers' Qwen3MoeForCausalLM with the same weights and
    output_router_logits=True gives that sum on a text-only batch (padded: the mask keeps pads out)."""
    from transformers import Qwen3MoeForCausalLM

    proc, model = FAM.load_processor(CFG35_MOE), FAM.load_model(CFG35_MOE).eval()
    short = SequenceSample(messages=[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}])
    batch = FAM.collate(
        [FAM.encode_sample(proc, s, 512) for s in (SequenceSample(messages=IMAGE_CHAT.messages), short)]
    )
    lm = Qwen3MoeForCausalLM(model.config.text_config).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    with torch.no_grad():
        ours = FAM.training_loss(model, None, batch, torch.Generator())
        theirs = lm(**batch, output_router_logits=True)
    assert theirs.aux_loss > 0 and model.config.text_config.router_aux_loss_coef == 0.001  # Qwen3-30B-A3B's value
    torch.testing.assert_close(ours, theirs.loss, atol=1e-5, rtol=0)
