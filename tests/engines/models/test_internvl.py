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
