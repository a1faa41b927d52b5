"""Families trained with a token-level loss: vision-language models and speech recognition.

They share the generation families' stages (prep caches tensors, the engine trains on the cache,
eval measures and samples) but not their internals: prep runs the family's own processor (chat
template, image/video patches, log-mel features) instead of a VAE, the objective is the causal LM
loss on the answer tokens, and inference is text. The trained network is `model.transformer` in
the config: the whole VLM or ASR model (`preset: tiny` or `pretrained: <dir or hub id>`).

A family subclasses `VisionLanguageFamily` or `SpeechFamily` and implements `load_model`,
`load_processor`, `encode_sample` and `respond`; it has no VAE, scheduler or latents because it is not a
`LatentFamily` (the capability mixins are below: TokenLossFamily, AnsweringFamily, TranscribingFamily).
"""

from __future__ import annotations

import inspect
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import Capability, ModelFamily, loaded
from torch import nn

IGNORE_INDEX = -100  # label value transformers' losses skip: prompt, system and padding tokens


@dataclass
class SequenceSample:
    """One training example as prep hands it to a family, media already decoded.

    messages: [{"role": "system"|"user"|"assistant", "content": str}], images as (H, W, C) uint8,
    videos as (T, H, W, C) uint8, audio as mono float32 at `sampling_rate`; `text` is the target of
    a speech sample (its transcript). `video_fps`: per video, the frame rate of its sampled frames
    (None where unknown); Qwen2.5-VL's processor turns it into the absolute time of each temporal patch.
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    audio: np.ndarray | None = None
    sampling_rate: int = 16000
    text: str = ""
    video_fps: list[float | None] = field(default_factory=list)


def chat_with_media(sample: SequenceSample, system: str | None = None) -> list[dict[str, Any]]:
    """`sample.messages` as a VLM chat template takes them: the images, then the videos, as typed parts of the
    first user turn before its text; `system` first where the sample brings no system turn of its own."""
    media = [{"type": "image"}] * len(sample.images) + [{"type": "video"}] * len(sample.videos)
    out: list[dict[str, Any]] = []
    placed = not media
    if system is not None and (not sample.messages or sample.messages[0]["role"] != "system"):
        out.append({"role": "system", "content": system})
    for m in sample.messages:
        if m["role"] == "user" and not placed:
            out.append({"role": "user", "content": [*media, {"type": "text", "text": m["content"]}]})
            placed = True
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if not placed:
        what = "images or videos" if sample.videos else "images"
        raise ValueError(f"the sample has {what} but no user turn to show them in")
    return out


def prompt_of(sample: SequenceSample) -> SequenceSample:
    """The sample as a prompt: an eval sample ends with its reference answer, the prompt is everything before it."""
    msgs = sample.messages
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return SequenceSample(messages=msgs, images=sample.images, videos=sample.videos, video_fps=sample.video_fps)


class TokenLossFamily(ModelFamily):
    """Capability TOKEN_LOSS: prep runs the family's own processor (chat template, media patches, log-mel
    features) and caches its tensors; the loss is transformers' causal LM loss on the answer tokens."""

    provides = (Capability.TOKEN_LOSS,)
    denoiser_subfolder = ""  # the export is one transformers folder: final/ itself
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: media this family reads from a manifest entry: "image", "video", "audio"
    media: tuple[str, ...] = ("image",)

    @abstractmethod
    def load_model(self, cfg: ModelConfig) -> nn.Module:
        """The trainable model: a seeded tiny preset, or from_pretrained(cfg.transformer.pretrained)."""

    @abstractmethod
    def load_processor(self, cfg: ModelConfig) -> Any:
        """Tokenizer + media processor; built offline for the tiny preset, from_pretrained otherwise."""

    @abstractmethod
    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        """One example -> the tensors the model's forward takes, cached as-is by prep.

        Always `input_ids` (L,) and `labels` (L,) with IGNORE_INDEX everywhere but the answer tokens
        (assistant turns, or the transcript); plus whatever the processor makes for media
        (pixel_values, image_grid_thw, input_features...). Raise ValueError for an unusable sample
        (no assistant turn, too long): prep records it as a rejection.
        """

    def load_transformer(self, cfg: ModelConfig, text_embed_dim: int = 0, latent_channels: int = 0) -> nn.Module:
        """`load_model`: the cache sizes nothing of a token-loss model (the engine's call takes the latent
        families' arguments too)."""
        return self.load_model(cfg)

    def bucket_key(self, record: dict[str, Any]) -> Any:
        """One bucket: `collate` pads token rows to the longest and concatenates media of any size, so any samples
        batch together (exact-shape buckets would leave real data, whose lengths all differ, without full batches).
        `train.packing` removes the padding this costs."""
        return "tokens"

    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        """The sample's decoder tokens (text and vision placeholders): what packing budgets and tokens/s counts."""
        return int(record["shapes"]["input_ids"][0])

    def vision_tokens(self, record: dict[str, Any]) -> int:
        """The vision encoder's input units of a sample: patches (Qwen-VL, GLM-4.1V) or tiles (InternVL, LLaVA),
        the first dimension of each cached `pixel_values*` tensor; `train.packing.max_vision_tokens` budgets them."""
        return sum(int(v[0]) for k, v in record.get("shapes", {}).items() if k.startswith("pixel_values"))

    #: token rows right-padded to the longest, with these values. Pad ids are 0 (a byte token):
    #: the attention mask and IGNORE_INDEX labels hide them, and 0 is never a media placeholder id.
    pad_values: dict[str, int] = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0}
    #: media tensors concatenated on dim 0 (patches, tiles, grids): how these VLMs batch media
    concat_keys: tuple[str, ...] = ("pixel_values",)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        batch: dict[str, torch.Tensor] = {}
        for key, value in self.pad_values.items():
            if key in items[0]:
                batch[key] = pad_sequence([it[key] for it in items], batch_first=True, padding_value=value)  # (B, L)
        for key in self.concat_keys:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts, dim=0)  # (sum over the batch, ...) in token order
        return batch

    #: decoder-only LMs predict token i+1 at position i (labels shift left by one); an encoder-decoder such as
    #: Whisper aligns logits with its labels and builds its decoder inputs from them (False: labels stay in the call)
    shift_labels: bool = True
    #: whether `pack` applies: one row of end-to-end samples with attention kept inside each needs a decoder-only model
    packable: bool = True

    def loss_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the loss averages over in this micro-batch: labelled targets after the shift."""
        labels = batch["labels"][..., 1:] if self.shift_labels else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def token_slots(self, batch: dict[str, torch.Tensor]) -> int:
        """Token positions the model computes for this micro-batch, pads included (a packed row has none)."""
        return int(batch["input_ids"].numel()) if "input_ids" in batch else int(batch["labels"].numel())

    def pack(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The samples end to end in ONE row (1, sum of lengths), no pad token anywhere.

        `cu_seqlens` (n+1,) marks where each sample starts; `training_loss` turns it into position ids that
        restart at every sample, from which transformers keeps attention inside each sample (a block-diagonal
        mask with SDPA/eager, varlen kernels with flash attention). Each sample's first label is masked: in
        the row it would be the target of the previous sample's last token, and alone it is never a target.
        Media tensors concatenate exactly as `collate` does, so the vision encoders see the same input.
        """
        if not self.packable:
            raise ValueError(f"{self.name} is an encoder-decoder model: its samples cannot be packed into one row")
        lengths = [len(it["input_ids"]) for it in items]
        batch: dict[str, torch.Tensor] = {}
        for key in self.pad_values:
            if key in items[0] and key != "attention_mask":
                batch[key] = torch.cat([it[key] for it in items]).unsqueeze(0)  # (1, L)
        firsts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        batch["labels"][0, firsts] = IGNORE_INDEX
        batch["cu_seqlens"] = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        for key in self.concat_keys:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch

    def packed_inputs(self, transformer: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A packed batch as the model's forward takes it: position ids restarting at each sample and no
        attention mask, which is how transformers recognises packed rows. Models with multimodal RoPE
        (a `get_rope_index`: Qwen-VL, GLM-4.1V) get their 3-D positions computed per sample by that very
        method, with the text positions as a 4th leading row (transformers' packed M-RoPE layout)."""
        cu = batch["cu_seqlens"].tolist()
        text = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:], strict=True)])
        text = text.to(batch["input_ids"].device).view(1, -1)  # (1, L)
        owners = _modules_with(transformer, "get_rope_index")
        out = {k: v for k, v in batch.items() if k != "cu_seqlens"}
        if not owners:
            out["position_ids"] = text
            return out
        rope = owners[0].get_rope_index
        accepted = set(inspect.signature(rope).parameters) - {"input_ids"}

        def mrope(rows: dict[str, torch.Tensor]) -> torch.Tensor:
            return rope(rows["input_ids"], **{k: v for k, v in rows.items() if k in accepted})[0]  # (3, n, longest)

        out["position_ids"] = torch.cat([text.view(1, 1, -1), per_sample_positions(batch, mrope)], dim=0)
        return out

    def training_loss(
        self, transformer: nn.Module, scheduler: Any, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """Cross-entropy summed over the labelled (answer) tokens, divided by `loss_normalizer`.

        The engine sets `loss_normalizer` to the labelled-token count of the whole global batch (over every
        micro-batch and data-parallel rank, divided by the ranks its gradient all-reduce averages over), so a
        step's gradient is the per-token mean over the global batch however its samples were split into
        micro-batches or packed into rows. Without it (one batch on its own) this is the batch's per-token
        mean, transformers' own loss.
        """
        batch = dict(batch)
        normalizer = batch.pop("loss_normalizer", None)
        # shifted labels: our reduction below, not the model's own mean
        labels = batch.pop("labels") if self.shift_labels else batch["labels"]
        if "cu_seqlens" in batch:
            batch = self.packed_inputs(transformer, batch)
        with self.vision_touch(transformer, batch) as touched:
            # no KV cache in training (transformers also reads a packed row's boundaries only when there is none)
            logits = transformer(**batch, use_cache=False).logits  # (B, L, vocab)
        if self.shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if normalizer is None:
            normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return total / normalizer + (sum(t.sum() for t in touched) * 0.0 if touched else 0.0)

    def dummy_image(self, config: Any) -> dict[str, torch.Tensor] | None:
        """A blank minimal image as the model's `get_image_features` takes it, or None (no vision tower)."""
        return None

    @contextmanager
    def vision_touch(self, transformer: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """Yields a list that the forward fills with the vision tower's output on a blank image when the micro-batch
        has no media (the loss adds it times 0); empty otherwise.

        Under FSDP every rank must gather and reduce the same parameters: a rank whose micro-batch is text-only
        would skip the vision tower and leave its trainable parts (the projector) without gradients while the
        other ranks reduce theirs, a collective mismatch that aborts the job. Touching the tower with zero
        weight keeps every rank's collectives alike and changes no value (the gradient it adds is exactly 0).
        It runs as a pre-hook of the innermost module with `get_image_features`, i.e. inside the sharded root's
        forward (parameters gathered) and before the decoder, where the vision tower runs on the other ranks.
        """
        touched: list[torch.Tensor] = []
        if any(k.startswith("pixel_values") for k in batch):  # the common case: no search, no hook
            yield touched
            return
        owners = _modules_with(transformer, "get_image_features")
        dummy = self.dummy_image(getattr(owners[-1], "config", None)) if owners else None
        if dummy is None:
            yield touched
            return
        device = batch["input_ids"].device

        def run_tower(module: nn.Module, args: tuple, kwargs: dict) -> None:
            out = module.get_image_features(**{k: v.to(device) for k, v in dummy.items()})
            # the features the model feeds its decoder (transformers' `pooler_output`), not e.g. the last layer's
            # states a LLaVA never uses: touching those would give gradients that the media ranks do not have
            features = out.get("pooler_output") if isinstance(out, dict) and "pooler_output" in out else out
            touched.extend(t for t in _tensors(features) if t.requires_grad)

        handle = owners[-1].register_forward_pre_hook(run_tower, with_kwargs=True)
        try:
            yield touched
        finally:
            handle.remove()

    def export_files(self, final_dir: Path) -> list[Path]:
        index = final_dir / "model.safetensors.index.json"  # big models save sharded weights
        return [final_dir / "config.json", index if index.exists() else final_dir / "model.safetensors"]

    def save_pretrained(self, out_dir: Path, cfg: ModelConfig, transformer: nn.Module) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        transformer.save_pretrained(out_dir, safe_serialization=True)
        self.load_processor(cfg).save_pretrained(out_dir)
        return out_dir


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a ModelOutput, tuple, list or a tensor)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def per_sample_positions(
    batch: dict[str, torch.Tensor], positions: Callable[[dict[str, torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """A packed row's position ids, each sample's as it has alone: the samples laid out as the padded
    (n, longest) batch the unpacked step builds (`input_ids`, `mm_token_type_ids`, an `attention_mask`, the media
    keys as they are), handed to the model's own position function `positions` in one call, the valid positions of
    every row then gathered back end to end: (3, n, longest) -> (3, 1, L), (n, longest) -> (1, L). Both engines
    use it, so packed and padded rotate identically on each."""
    cu = batch["cu_seqlens"].tolist()
    lengths = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:], strict=True)])
    device = batch["input_ids"].device
    keep = (torch.arange(int(lengths.max())) < lengths[:, None]).to(device)  # (n, longest)

    def padded(row: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*keep.shape, dtype=row.dtype, device=device)
        out[keep] = row[0]
        return out

    rows = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "labels", "attention_mask", "loss_normalizer")}
    rows.update({k: padded(batch[k]) for k in ("input_ids", "mm_token_type_ids") if k in batch})
    rows["attention_mask"] = keep.long()
    return positions(rows)[..., keep].unsqueeze(-2)


_OWNERS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[nn.Module]]] = weakref.WeakKeyDictionary()


def _modules_with(model: nn.Module, method: str) -> list[nn.Module]:
    """The submodules of `model` (outermost first) that have `method`, found once per model: the training step asks
    for them every micro-batch, and walking a 72B model's modules each time is work for nothing."""
    found = _OWNERS.setdefault(model, {})
    if method not in found:
        found[method] = [m for m in model.modules() if callable(getattr(m, method, None))]
    return found[method]


class RespondingFamily(ModelFamily):
    """What ANSWERS and TRANSCRIPTION share: `respond` turns media (and a conversation) into text with an
    export. A family is one of the two mixins below, which say what the text is."""

    @abstractmethod
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy answers (or transcripts) from an exported model, for eval and inference."""


class AnsweringFamily(RespondingFamily):
    """Capability ANSWERS: `respond` answers conversations about images or videos (held-out answers,
    benchmarks; serving takes a prompt and an optional image)."""

    provides = (Capability.ANSWERS,)


class TranscribingFamily(RespondingFamily):
    """Capability TRANSCRIPTION: `respond` transcribes speech (WER/CER; serving takes an audio file)."""

    provides = (Capability.TRANSCRIPTION,)


class SequenceFamily(TokenLossFamily, RespondingFamily):
    """The VLMs' and the speech families' common base: trained on the token loss, read by `respond`.
    A concrete family adds what its answers are: `VisionLanguageFamily` or `SpeechFamily`."""

    @property
    def kind(self) -> str:
        """A label for people and cache records ("speech" or "understanding"); code asks `can(...)`."""
        return "speech" if self.can(Capability.TRANSCRIPTION) else "understanding"


class VisionLanguageFamily(SequenceFamily, AnsweringFamily):
    """A VLM: conversations about images/videos in, answers out (TOKEN_LOSS + ANSWERS)."""

    #: the transformers class an export loads as (`load_export`)
    model_cls: type

    def dummy_image(self, config: Any) -> dict[str, torch.Tensor] | None:
        """One merged token's worth of flattened patches and its (1, m, m) grid for a Qwen-VL-style tower
        (a `temporal_patch_size`), else one blank image at the tower's input size (LLaVA, InternVL)."""
        v = getattr(config, "vision_config", None)
        if v is None:
            return None
        if hasattr(v, "temporal_patch_size"):
            m = int(getattr(v, "spatial_merge_size", 1))
            dim = int(getattr(v, "in_channels", 3)) * int(v.temporal_patch_size) * int(v.patch_size) ** 2
            return {"pixel_values": torch.zeros(m * m, dim), "image_grid_thw": torch.tensor([[1, m, m]])}
        size = v.image_size if isinstance(v.image_size, list | tuple) else (v.image_size, v.image_size)
        return {"pixel_values": torch.zeros(1, int(getattr(v, "num_channels", 3)), int(size[0]), int(size[1]))}

    def load_export(self, pretrained_dir: Path, device: torch.device) -> tuple[nn.Module, Any]:
        """(model in eval mode on `device`, processor) of an export, kept across batches inside `keep_loaded`."""
        from transformers import AutoProcessor

        model = loaded(lambda: self.model_cls.from_pretrained(pretrained_dir).to(device).eval(), pretrained_dir, device)
        processor = loaded(lambda: AutoProcessor.from_pretrained(pretrained_dir), pretrained_dir, "processor")
        return model, processor

    def process_chat(
        self, processor: Any, text: str, sample: SequenceSample, max_length: int, **processor_kwargs: Any
    ) -> Any:
        """The processor's tensors for one rendered conversation and the sample's media, (1, L) rows; a sample over
        `max_length` tokens is refused (prep records the rejection) rather than cut, which would drop answers."""
        enc = processor(
            text=[text], images=sample.images or None, videos=sample.videos or None, return_tensors="pt",
            **processor_kwargs,
        )  # fmt: skip
        n = enc["input_ids"].shape[1]
        if n > max_length:
            raise ValueError(
                f"the sample is {n} tokens (text + vision placeholders), over model.max_text_length={max_length}: "
                "raise model.max_text_length, or shorten the conversation or the media"
            )
        return enc

    @torch.no_grad()
    def generate_answers(
        self,
        model: nn.Module,
        processor: Any,
        samples: list[SequenceSample],
        chats: list[list[dict[str, Any]]],
        *,
        max_new_tokens: int,
        device: torch.device,
        skip_special_tokens: bool = True,
        **processor_kwargs: Any,
    ) -> list[str]:
        """Greedy answers to `chats` (one per sample, the sample's media in it), batched: each chat rendered with
        its generation prompt, left-padded (generation continues from the right edge), the new tokens decoded."""
        processor.tokenizer.padding_side = "left"
        texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        images = [im for s in samples for im in s.images]
        videos = [v for s in samples for v in s.videos]
        enc = processor(
            text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt",
            **processor_kwargs,
        )  # fmt: skip
        out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
        return processor.batch_decode(new, skip_special_tokens=skip_special_tokens)


class SpeechFamily(SequenceFamily, TranscribingFamily):
    """Speech recognition: audio in, transcript out (TOKEN_LOSS + TRANSCRIPTION)."""

    media = ("audio",)
    shift_labels = False  # Whisper: logits align with labels; the forward shifts them into decoder inputs
    packable = False
