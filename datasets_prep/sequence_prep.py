"""Prep for the token-loss families (VLMs, speech): manifest -> decoded media -> processor tensors.

The same cache, keys, slices, rejections and summary as the generation prep; only the encoding
differs. Each sample goes through its family's own processor (chat template, image/video patches
or log-mel features) once, and the result (`input_ids`, `labels`, media tensors) is cached, so
training never tokenizes or decodes. Sources it accepts:

- LLaVA/ShareGPT conversations (`messages` / `conversations` with `images` / `videos`);
- audio + transcript tables, for speech families;
- any captioned image/video manifest (the generation families' data): each clip becomes a
  one-turn conversation "describe this" -> its caption, i.e. captioning SFT on the same data;
- preference records (DPO), told by the DATA, not by train.method (prep's key has no method): a `chosen` and a
  `rejected` answer beside the prompt, as LLaMA-Factory's ShareGPT DPO layout (`conversations` + `chosen` /
  `rejected` turns) or a TRL-style table row (`image`, `prompt`, `chosen`, `rejected`). Each side is the whole
  conversation ending in that answer, encoded by the family (answer-only labels) and cached as `chosen_<name>` /
  `rejected_<name>` token rows; the media tensors once (both sides show the same media). The chosen side is also
  cached under the plain names, so an SFT run on a preference cache trains on the chosen answers unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.datasets_prep.decode import decode, resize_center_crop
from flowspeed.datasets_prep.manifest import Entry, EscapedRoot, Rejection, opened_under
from flowspeed.datasets_prep.probe import IMAGE_SUFFIXES, MediaInfo, ProbeError, probe
from flowspeed.engines.common.io import file_digest, text_digest
from flowspeed.engines.common.progress import reporter
from flowspeed.engines.models.sequence import SequenceFamily, SequenceSample

#: the two sides of a preference record, as cache-name prefixes: `chosen_input_ids`, `rejected_labels`, ...
SIDES = ("chosen", "rejected")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system"}  # fmt: skip
DESCRIBE = {"image": "Describe this image.", "video": "Describe this video."}


def encoder_identity(cfg: PipelineConfig) -> str:
    """What makes cached tensors comparable: the family and the processor's (model's) source."""
    m = cfg.model
    seed = f"|seed={m.seed}" if m.transformer.pretrained is None else ""
    return f"{m.family}|processor={m.transformer.identity()}{seed}"


def _as_image(entry: Entry, family: SequenceFamily) -> bool:
    """A captioned clip for an image-only family is captioned from its middle frame."""
    return entry.path.suffix.lower() in IMAGE_SUFFIXES or "video" not in family.media


def messages_of(entry: Entry, family: SequenceFamily) -> list[dict[str, str]]:
    """Conversation turns in {"role", "content"} form; media placeholders are the family's business."""
    turns = entry.meta.get("messages")
    if turns is None:  # a captioned clip: captioning SFT
        if not entry.caption:
            raise ValueError("no caption to learn (a captions/text column), and no conversation")
        kind = "image" if _as_image(entry, family) else "video"
        return [{"role": "user", "content": DESCRIBE[kind]}, {"role": "assistant", "content": entry.caption or ""}]
    return normalised_turns(turns)


def normalised_turns(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turns as {"role", "content"}, placeholders dropped."""
    out = []
    for t in turns:
        role = ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        if role is None:
            raise ValueError(f"unknown conversation role {t.get('role', t.get('from'))!r}; use user/assistant/system")
        text = str(t.get("content", t.get("value", "")))
        out.append({"role": role, "content": text.replace("<image>", "").replace("<video>", "").strip()})
    return out


def _digest(path: Path, roots: tuple[Path, ...]) -> str:
    with opened_under(path, roots) as opened:
        return file_digest(opened)


def load_sample(entry: Entry, family: SequenceFamily, cfg: PipelineConfig) -> SequenceSample:
    """Decode what the family reads: images as (H, W, C), videos as (T, H, W, C) uint8, audio as 16 kHz mono.

    Decoders read each file as opened once and checked under the entry's roots (`opened_under`), so a
    symlink swapped in after the manifest was read cannot hand them a file from elsewhere."""
    if "audio" in family.media:
        from flowspeed.datasets_prep.audio import load_audio

        if not entry.caption:
            raise ValueError("no transcript (text/transcript/sentence column)")
        with opened_under(entry.path, entry.roots) as path:
            audio = load_audio(path, 16000)
        return SequenceSample(audio=audio, sampling_rate=16000, text=entry.caption)
    sample = SequenceSample(messages=messages_of(entry, family))
    captioned = entry.meta.get("messages") is None
    for media in entry.media or (entry.path,):
        with opened_under(media, entry.roots) as path:
            _load_media(sample, entry, family, cfg, probe(media), path, captioned)
    return sample


def _load_media(
    sample: SequenceSample, entry: Entry, family: SequenceFamily, cfg: PipelineConfig, info: MediaInfo,
    path: Path, captioned: bool,
) -> None:  # fmt: skip
    """One image or video of a sample, decoded from `path` (the checked descriptor's) into `sample`."""
    d = cfg.data
    info = replace(info, path=str(path))
    if info.kind == "image" or (captioned and _as_image(entry, family)):
        middle = [max(info.num_frames - 1, 0) // 2]  # a still's only frame, or a clip's middle one
        if "image" not in family.media:
            raise ValueError(f"{family.name} takes no images")
        frames, _ = decode(info, middle, d.decoder)
        sample.images.append(resize_center_crop(frames, d.height, d.width)[0].numpy())
    else:
        if "video" not in family.media:
            raise ValueError(f"{family.name} takes no videos")
        n = min(d.num_frames, max(info.num_frames, 1))
        idx = np.linspace(0, max(info.num_frames - 1, 0), n).round().astype(int).tolist()
        frames, _ = decode(info, idx, d.decoder)
        sample.videos.append(resize_center_crop(frames, d.height, d.width).numpy())
        # transformers' VideoMetadata.sampled_fps of these frames: len(indices) / total frames * fps
        sample.video_fps.append(n / info.num_frames * info.fps if info.fps > 0 and info.num_frames > 0 else None)


def sequence_slice(
    cfg: PipelineConfig,
    family: SequenceFamily,
    items: list,
    cached: dict[str, dict],
    cache: LatentCache,
    rejects: list[Rejection],
) -> tuple[list[dict], list[dict], int]:
    """(records already cached, records written now, processor calls) for this slice's items."""
    prep_hash, encoder = cfg.prep_hash(), encoder_identity(cfg)
    processor = family.load_processor(cfg.model)
    done: list[dict] = []
    written: list[dict] = []
    shard: list[tuple[dict, dict[str, Any]]] = []
    calls = 0
    rep = reporter()
    rep.start("encode", len(items))
    for item in items:
        rep.advance("encode")
        if isinstance(item, Rejection):
            rejects.append(item)
            continue
        where, stage = str(item.path), "manifest"
        try:
            pair = preference_of(item) if is_preference(item) else None
            stage = "probe"
            media = item.media or (item.path,)
            missing = [str(p) for p in media if not Path(p).is_file()]
            if missing:
                raise ProbeError("not_found", f"file not found: {', '.join(missing)}")
            payload = repr(item.meta.get("messages")) + (item.caption or "") if pair is None else repr(pair)
            key = text_digest(*(_digest(Path(p), item.roots) for p in media), payload, prep_hash, encoder)
            if key in cached:
                done.append(cached[key])
                continue
            stage = "decode"
            if pair is None:
                sample = load_sample(item, family, cfg)
                stage = "encode"
                tensors = family.encode_sample(processor, sample, cfg.model.max_text_length)
                calls += 1
                record = _record(item, key, prep_hash, encoder, family, sample, tensors)
            else:
                prompt, answers = pair
                sample = load_sample(replace(item, meta={**item.meta, "messages": prompt}), family, cfg)
                stage = "encode"
                sample, tensors = encode_preference(family, processor, sample, answers, cfg.model.max_text_length)
                calls += 2
                record = _record(item, key, prep_hash, encoder, family, sample, tensors)
                record.update(preference=True, captioned=False, chosen=_answer_text(answers[0]),
                              rejected=_answer_text(answers[1]))  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (one record's loss: a decoder's, a tokenizer's, MemoryError, ...)
            rejects.append(record_rejection(where, stage, item.line, exc))
            continue
        shard.append((record, tensors))
        if len(shard) >= cfg.data.shard_size:
            cache.write_shard(shard)
            written.extend(r for r, _ in shard)
            shard.clear()
    if shard:
        cache.write_shard(shard)
        written.extend(r for r, _ in shard)
    rep.finish("encode")
    return done, written, calls


class PreferenceError(ValueError):
    """A preference record that cannot make a pair (a side missing or empty, the two the same): its rejection's code
    is `bad_preference`, apart from the sides that are only too long (`unusable`, as any sample over the limit)."""


def is_preference(entry: Entry) -> bool:
    """Whether the DATA makes this a preference record: either side given (one alone is a rejection, not SFT)."""
    return any(side in entry.meta for side in SIDES)


def _turns(value: Any, default_role: str, what: str) -> list[dict[str, str]]:
    """A prompt or an answer as {"role", "content"} turns: a plain string (one `default_role` turn), one ShareGPT /
    OpenAI turn (`from`/`value` or `role`/`content`), or a list of them (TRL's conversational rows)."""
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise PreferenceError(f"{what} is {type(value).__name__}: give a string, a turn or a list of turns")
    return normalised_turns(value)


def _answer_text(turns: list[dict[str, str]]) -> str:
    return "\n".join(t["content"] for t in turns if t["role"] == "assistant")


def preference_of(entry: Entry) -> tuple[list[dict], tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """(the prompt's raw turns, (chosen turns, rejected turns)) of a preference record, or PreferenceError.

    The prompt is a ShareGPT record's `conversations`/`messages` (its media placeholders kept for `messages_of`) or
    a table row's `prompt` column (a string: one user turn; or turns). Each answer must end the conversation with a
    non-empty assistant turn, and the two must differ: a pair with nothing to prefer teaches nothing."""
    meta = entry.meta
    missing = [side for side in SIDES if meta.get(side) in (None, "", [], {})]
    if missing:
        raise PreferenceError(f"no {' and no '.join(missing)} answer (a preference record needs both sides)")
    prompt = meta.get("messages")
    if prompt is None:
        if not isinstance(meta.get("prompt"), str | list) or not meta["prompt"]:
            raise PreferenceError('no prompt: give a "prompt" column (or ShareGPT "conversations") beside the answers')
        prompt = _turns(meta["prompt"], "user", "prompt")
    answers = tuple(_turns(meta[side], "assistant", side) for side in SIDES)
    for side, turns in zip(SIDES, answers, strict=True):
        if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise PreferenceError(f"the {side} answer is empty or does not end with an assistant turn")
    if answers[0] == answers[1]:
        raise PreferenceError("chosen and rejected are the same answer: nothing to prefer")
    return prompt, answers  # type: ignore[return-value]


def encode_preference(
    family: SequenceFamily, processor: Any, prompt: SequenceSample, answers: tuple[list[dict], list[dict]],
    max_length: int,
) -> tuple[SequenceSample, dict[str, Any]]:  # fmt: skip
    """(the chosen conversation, the cached tensors) of one pair, both sides encoded by the family's own processor.

    Token rows (the family's `pad_values` names) are cached per side as `chosen_<name>` / `rejected_<name>`, and the
    chosen side's under the plain names too (SFT on a preference cache learns the chosen answers); media tensors
    (patches, grids) once, after checking the two encodings made them identical. A side over `max_length` raises
    the family's ValueError (an `unusable` rejection, as for SFT)."""
    samples = [replace(prompt, messages=[*prompt.messages, *turns]) for turns in answers]
    encoded = [family.encode_sample(processor, s, max_length) for s in samples]
    rows = [k for k in family.pad_values if k in encoded[0]]
    media = sorted(set(encoded[0]) - set(rows))
    if sorted(set(encoded[1]) - set(rows)) != media or not all(
        torch.equal(encoded[0][k], encoded[1][k]) for k in media
    ):  # fmt: skip
        raise AssertionError("the chosen and rejected encodings of one prompt made different media tensors")
    tensors = {k: encoded[0][k] for k in (*rows, *media)}
    for side, enc in zip(SIDES, encoded, strict=True):
        tensors.update({f"{side}_{k}": enc[k].clone() for k in rows})  # own storage: safetensors refuses shared
    return samples[0], tensors


def record_rejection(where: str, stage: str, line: int, exc: Exception) -> Rejection:
    """One record's failure, whatever raised it, as its rejection: a ProbeError's own reason and code,
    otherwise the exception's type and message (a family's refusal, a ValueError, is "unusable")."""
    if isinstance(exc, ProbeError):
        return Rejection(where, stage, str(exc), exc.code)
    if isinstance(exc, PreferenceError):
        return Rejection(where, stage, f"record {line}: {exc}", "bad_preference")
    if isinstance(exc, EscapedRoot):
        code = "escapes_root"
    elif isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        code = "unusable"
    else:
        code = "exception"
    return Rejection(where, stage, f"record {line}: {type(exc).__name__}: {exc}", code)


def _record(
    item: Entry, key: str, prep_hash: str, encoder: str, family: SequenceFamily, sample: SequenceSample,
    tensors: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The cache record of one encoded sample (built inside the record's own try: it may still fail)."""
    media = item.media or (item.path,)
    return {
        "key": key, "source": str(item.path), "media": [str(p) for p in media], "manifest_line": item.line,
        "prep_hash": prep_hash, "encoder": encoder, "kind": family.kind, "clip_range": None,
        "messages": sample.messages, "text": sample.text, "caption": item.caption,
        "captioned": "messages" not in item.meta,
        "num_frames": sum(len(v) for v in sample.videos) + len(sample.images),
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
    }  # fmt: skip


def sample_of(record: dict[str, Any], family: SequenceFamily, cfg: PipelineConfig) -> SequenceSample:
    """Rebuild a cached record's sample (eval prompts the model with held-out ones)."""
    media = tuple(Path(p) for p in record["media"])
    meta = {} if record.get("captioned", True) else {"messages": record["messages"]}
    entry = Entry(record["manifest_line"], media[0], record.get("caption") or record.get("text"), media, meta)
    sample = load_sample(entry, family, cfg)
    if record.get("messages"):
        sample.messages = record["messages"]
    return sample
