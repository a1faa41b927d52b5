"""InternVL's ORIGINAL checkpoints (OpenGVLab's own `InternVLChatModel` code), opt-in and local only.

Loaded with `trust_remote_code` only when `model.transformer.trust_remote_code: true` and
`model.transformer.pretrained` is a local directory whose config.json declares `auto_map`
(internvl.py decides; this module loads and encodes). The inputs follow the layout of OpenGVLab's
training code (internvl_chat/internvl/train/dataset.py, conversation.py) and `InternVLChatModel`:

* each image is cut into `image_size`-px tiles on the grid (cols x rows, min..max_dynamic_patch
  tiles) whose aspect ratio is closest to the image's, plus a whole-image thumbnail when there is
  more than one tile; tiles are normalised with the ImageNet mean/std. A video frame is one tile.
* each tile is `num_image_token` = (image_size / patch_size)^2 * downsample_ratio^2 `<IMG_CONTEXT>`
  tokens; an image is `<img>` + its tiles' tokens + `</img>`, put at the start of the first user
  turn (`Image-i: ` before each when there are several, `Frame-i: ` before each video frame).
* the conversation is the ChatML of `config.template`, always with a system turn (the sample's,
  else config.system_message, else the template's default); `image_flags` is 1 per tile; a
  text-only sample gets one blank tile flagged 0, as the original trainer does.
* labels: each answer and its `<|im_end|>`; the template's turn separator after it is not trained.

Exports of such a run keep the checkpoint's code (transformers copies it on save_pretrained) and a
marker, MARKER, saying the run was opted in: `respond` runs an export's code only when it is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ComponentConfig
from flowspeed.engines.models.registry import from_pretrained, loaded
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import InternVLForConditionalGeneration

MARKER = "flowspeed_trust_remote_code.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SYSTEM_V2 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
SYSTEM_V25 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# conversation.py, SeparatorStyle.MPT: "<|im_start|>{role}\n{text}" + sep for every turn (system first).
# Hermes-2 and internlm2-chat differ only in the trainer: internlm2-chat's tokenizer adds <s> and
# its messages are stripped. internvl2_5 ends every turn with a newline, which is not trained.
TEMPLATES: dict[str, dict[str, Any]] = {
    "Hermes-2": {"sep": "<|im_end|>", "system": _SYSTEM_V2, "strip": False},
    "internlm2-chat": {"sep": "<|im_end|>", "system": _SYSTEM_V2, "strip": True},
    "internvl2_5": {"sep": "<|im_end|>\n", "system": SYSTEM_V25, "strip": False},
}


def remote_config(comp: ComponentConfig) -> dict[str, Any] | None:
    """config.json of a local original (custom-code) InternVL checkpoint, else None."""
    if not comp.pretrained:
        return None
    path = Path(comp.pretrained, comp.subfolder or "", "config.json")
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return meta if "auto_map" in meta and meta.get("model_type") != "internvl" else None


@dataclass
class RemoteInternVLProcessor:
    """What the original code's `chat` and dataset take from the config and tokenizer."""

    tokenizer: Any
    template: str
    system_message: str
    image_size: int
    num_image_token: int
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    dynamic: bool = True

    @classmethod
    def from_config(cls, meta: dict[str, Any], tokenizer: Any) -> RemoteInternVLProcessor:
        template = meta.get("template")
        if template not in TEMPLATES:
            raise ValueError(
                f"the checkpoint's conversation template {template!r} is not supported for original InternVL "
                f"checkpoints; supported: {', '.join(TEMPLATES)} (InternVL2-1B/2B/8B/26B/40B, InternVL2.5, "
                "InternVL3). Convert the checkpoint to the native -hf format instead."
            )
        vision = meta.get("vision_config") or {}
        image_size = int(meta.get("force_image_size") or vision.get("image_size") or 448)
        patch = int(vision.get("patch_size") or 14)
        ratio = float(meta.get("downsample_ratio", 0.5))
        return cls(
            tokenizer=tokenizer,
            template=template,
            system_message=meta.get("system_message") or TEMPLATES[template]["system"],
            image_size=image_size,
            num_image_token=int((image_size // patch) ** 2 * ratio**2),
            min_tiles=int(meta.get("min_dynamic_patch", 1)),
            max_tiles=int(meta.get("max_dynamic_patch", 12)),
            use_thumbnail=bool(meta.get("use_thumbnail", True)),
            dynamic=bool(meta.get("dynamic_image_size", True)),
        )

    def save_pretrained(self, out_dir: Path | str) -> None:
        self.tokenizer.save_pretrained(out_dir)  # the rest lives in config.json, saved with the model


def load_remote_tokenizer(comp: ComponentConfig) -> Any:
    from transformers import AutoTokenizer

    # As OpenGVLab's code loads it: their InternLM2 tokenizer is custom code and slow-only.
    return from_pretrained(AutoTokenizer, comp, "transformer", trust_remote_code=True, use_fast=False)


def load_remote_model(comp: ComponentConfig) -> Any:
    from transformers import AutoModel

    model = from_pretrained(AutoModel, comp, "transformer", trust_remote_code=True)
    model.img_context_token_id = load_remote_tokenizer(comp).convert_tokens_to_ids("<IMG_CONTEXT>")
    return model


def load_remote_processor(comp: ComponentConfig, meta: dict[str, Any]) -> RemoteInternVLProcessor:
    return RemoteInternVLProcessor.from_config(meta, load_remote_tokenizer(comp))


# ---- images -------------------------------------------------------------------------------------
def tile_grid(width: int, height: int, size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; on a tie the larger grid wins when
    the image has more than half the grid's pixels (the original's rule)."""
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles},
        key=lambda g: g[0] * g[1],
    )
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * size * size * c * r:
            best = (c, r)
    return best


def _normalise(img: Image.Image, size: int) -> torch.Tensor:
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def image_tiles(image: np.ndarray, proc: RemoteInternVLProcessor, max_tiles: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (tiles, 3, S, S): the grid's tiles row by row, then the thumbnail."""
    img, size = Image.fromarray(image).convert("RGB"), proc.image_size
    if not proc.dynamic:
        return _normalise(img, size)[None]
    cols, rows = tile_grid(img.width, img.height, size, proc.min_tiles, max_tiles)
    big = img.resize((cols * size, rows * size), Image.BICUBIC)
    crops = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if proc.use_thumbnail and len(crops) > 1:
        crops.append(img)
    return torch.stack([_normalise(c, size) for c in crops])


# ---- text ---------------------------------------------------------------------------------------
def _media(proc: RemoteInternVLProcessor, sample: SequenceSample) -> tuple[str, list[torch.Tensor]]:
    """The text put before the first question, and the tiles in the order of their tokens."""

    def block(n_tiles: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * (proc.num_image_token * n_tiles) + "</img>"

    per_image = max(1, proc.max_tiles // max(1, len(sample.images)))
    tiles, lines = [], []
    for i, image in enumerate(sample.images, 1):
        t = image_tiles(image, proc, per_image)
        tiles.append(t)
        lines.append((f"Image-{i}: " if len(sample.images) > 1 else "") + block(len(t)))
    for video in sample.videos:
        for i, frame in enumerate(video, 1):
            tiles.append(_normalise(Image.fromarray(frame).convert("RGB"), proc.image_size)[None])
            lines.append(f"Frame-{i}: " + block(1))
    return "".join(line + "\n" for line in lines), tiles


def encode_remote(
    proc: RemoteInternVLProcessor, sample: SequenceSample, *, generation_prompt: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels, pixel_values (tiles, 3, S, S) and image_flags (tiles,)."""
    tok, spec = proc.tokenizer, TEMPLATES[proc.template]
    prefix, tiles = _media(proc, sample)
    msgs = [dict(m) for m in sample.messages]
    system = proc.system_message
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    if tiles:
        first_user = next((m for m in msgs if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("the sample has images or videos but no user turn to show them in")
        first_user["content"] = prefix + first_user["content"]
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
        ids, labels = [tok.bos_token_id], [IGNORE_INDEX]  # InternLM2's tokenizer starts with <s>
    turns = [{"role": "system", "content": system}, *msgs]
    for m in turns:
        header = f"<|im_start|>{m['role']}\n"
        text = m["content"].strip() if spec["strip"] else m["content"]
        turn = tok(header + text + spec["sep"], add_special_tokens=False)["input_ids"]
        lab = [IGNORE_INDEX] * len(turn)
        if m["role"] == "assistant":
            head = tok(header, add_special_tokens=False)["input_ids"]
            if turn[: len(head)] != head or end_id not in turn:
                raise ValueError("an assistant turn does not tokenize as <|im_start|>assistant\\n ... <|im_end|>")
            end = len(turn) - 1 - turn[::-1].index(end_id)  # the answer's <|im_end|>, not the separator after
            lab[len(head) : end + 1] = turn[len(head) : end + 1]
        ids += turn
        labels += lab
    if generation_prompt:
        gen = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids, labels = ids + gen, labels + [IGNORE_INDEX] * len(gen)
    if tiles:
        pixel_values = torch.cat(tiles)
        flags = torch.ones(len(pixel_values), dtype=torch.long)
    else:  # the trainer's pure-text items: one blank tile whose features are dropped (flag 0)
        pixel_values = torch.zeros(1, 3, proc.image_size, proc.image_size)
        flags = torch.zeros(1, dtype=torch.long)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": pixel_values,
        "image_flags": flags,
    }


# ---- inference ----------------------------------------------------------------------------------
@torch.no_grad()
def respond_remote(pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device) -> list[str]:  # noqa: ANN001
    """Greedy answers through the checkpoint's own `generate` (what its `chat`/`batch_chat` call), batched
    with left padding; only the tiles of samples with media go in, in token order."""
    if not (pretrained_dir / MARKER).is_file():
        raise ValueError(
            f"{pretrained_dir} holds an original InternVL checkpoint's own code but no {MARKER}: flowspeed runs "
            "checkpoint code only for exports of runs with model.transformer.trust_remote_code: true"
        )
    comp = ComponentConfig(pretrained=str(pretrained_dir), preset=None, trust_remote_code=True)
    meta = json.loads((pretrained_dir / "config.json").read_text())
    model = loaded(lambda: load_remote_model(comp).to(device).eval(), pretrained_dir, device)
    proc = loaded(lambda: load_remote_processor(comp, meta), pretrained_dir, "processor")
    tok = proc.tokenizer
    dtype = next(model.parameters()).dtype
    rows, tiles = [], []
    for s in samples:
        msgs = s.messages[:-1] if s.messages and s.messages[-1]["role"] == "assistant" else s.messages
        enc = encode_remote(proc, SequenceSample(messages=msgs, images=s.images, videos=s.videos),
                            generation_prompt=True)  # fmt: skip
        rows.append(enc["input_ids"])
        if enc["image_flags"].all():
            tiles.append(enc["pixel_values"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|im_end|>")
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    eos_id = tok.convert_tokens_to_ids(TEMPLATES[proc.template]["sep"].strip())
    out = model.generate(
        pixel_values=torch.cat(tiles).to(device, dtype) if tiles else None,
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    ).cpu()
    # The original generates from input embeddings, so it returns the new tokens only; strip a prompt if echoed.
    width = input_ids.shape[1]
    if out.shape[1] > width and torch.equal(out[:, :width], input_ids):
        out = out[:, width:]
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return [t.split("<|im_end|>")[0].strip() for t in texts]


# ---- the original releases' weight layout ---------------------------------------------------------
class OriginalLayoutInternVL(InternVLForConditionalGeneration):
    """transformers' InternVL holding an original InternVL2 release's shapes, named as that release names them.

    The InternVL2 releases (InternVL2-2B/8B/26B, InternVL2-Llama3-76B) are InternViT + pixel-shuffle MLP +
    InternLM2 or Llama. InternLM2 is Llama's computation with q/k/v fused into one `wqkv` and its own names, so
    the native class with a Llama text config has exactly the release's parameters; `to_original` gives the
    release's names (OpenGVLab's modeling_internvl_chat.py / modeling_intern_vit.py / modeling_internlm2.py) so
    variants and fact tables compare against the released layout, not a conversion of it.
    """

    #: the text model of the release: "internlm2" (fused wqkv, InternLM2 names) or "llama" (Llama names)
    original_llm = "internlm2"

    def to_original(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> the release's keys and tensors.

        InternViT fuses q, k, v into one `qkv` (q rows, then k, then v); InternLM2's `wqkv` interleaves them per
        kv group: each group's q heads, then its k head, then its v head (modeling_internlm2.py splits the
        output as `(h gs d)` with gs = q heads per group + 2).
        """
        text = self.config.text_config
        heads, kv = text.num_attention_heads, text.num_key_value_heads
        head_dim = text.hidden_size // heads
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            in_text = key.startswith("model.language_model.")
            fused = not in_text or self.original_llm == "internlm2"
            if fused and (".k_proj." in key or ".v_proj." in key):
                continue  # folded into the fused projection with its q_proj below
            if fused and ".q_proj." in key:
                k, v = (state[key.replace(".q_proj.", f".{p}_proj.")] for p in "kv")
                if in_text:  # (kv groups, q heads per group + 2, head_dim, hidden)
                    parts = [value.reshape(kv, heads // kv, head_dim, -1), k.reshape(kv, 1, head_dim, -1),
                             v.reshape(kv, 1, head_dim, -1)]  # fmt: skip
                    value = torch.cat(parts, dim=1).reshape(-1, value.shape[-1])
                else:
                    value = torch.cat([value, k, v], dim=0)
            out[self._original_name(key)] = value
        return out

    def _original_name(self, key: str) -> str:
        for ours, theirs in _ORIGINAL_NAMES[self.original_llm] + _ORIGINAL_NAMES["common"]:
            key = key.replace(ours, theirs, 1)
        return key


class OriginalLayoutInternVLLlama(OriginalLayoutInternVL):
    """The Llama-based release (InternVL2-Llama3-76B): Llama's own names under `language_model.`."""

    original_llm = "llama"


# (our prefix or infix, the release's), applied in order; infixes start with "."
_ORIGINAL_NAMES: dict[str, list[tuple[str, str]]] = {
    "internlm2": [
        ("model.language_model.embed_tokens.", "language_model.model.tok_embeddings."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.output."),
        (".self_attn.q_proj.", ".attention.wqkv."),
        (".self_attn.o_proj.", ".attention.wo."),
        (".mlp.gate_proj.", ".feed_forward.w1."),
        (".mlp.up_proj.", ".feed_forward.w3."),
        (".mlp.down_proj.", ".feed_forward.w2."),
        (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
    ],
    "llama": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    "common": [
        ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
        ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
        ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
        ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
        (".attention.q_proj.", ".attn.qkv."),
        (".attention.q_norm.", ".attn.q_norm."),
        (".attention.k_norm.", ".attn.k_norm."),
        (".attention.projection_layer.", ".attn.proj."),
        (".lambda_1", ".ls1"),
        (".lambda_2", ".ls2"),
        (".layernorm_before.", ".norm1."),
        (".layernorm_after.", ".norm2."),
        ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
        ("model.multi_modal_projector.linear_1.", "mlp1.1."),
        ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    ],
}
