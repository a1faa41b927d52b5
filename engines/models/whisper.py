"""Whisper speech recognition: transformers' WhisperForConditionalGeneration, WhisperProcessor and generate.

The tensors follow transformers' own fine-tuning convention: `labels` is the tokenized transcript
(`<|lang|> <|task|> <|notimestamps|> text <|endoftext|>`) without the leading
`<|startoftranscript|>`, because the model's forward builds `decoder_input_ids` by shifting the
labels right behind `decoder_start_token_id` (= `<|startoftranscript|>`). Greedy `generate` starts
from the same prompt, so what is trained is what is transcribed.

The cache holds exactly what the forward takes, `input_features` (80, frames) and `labels` (L,);
there is no `input_ids`, so the default `training_loss` (`model(**batch).loss`) applies unchanged
and `sample_tokens` counts from the cached shapes instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models.registry import from_pretrained, loaded, pick_preset, register_family, seeded_init
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample, SpeechFamily
from flowspeed.engines.models.tokenizer import byte_vocab
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TASK_IDS

SAMPLING_RATE = 16000  # every Whisper checkpoint's feature extractor
HOP_LENGTH = 160  # 10 ms mel frames; the encoder's two convolutions halve them: 2 frames per position
LANGUAGE, TASK = "en", "transcribe"  # the tiny preset's decoder prompt

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Published whisper-tiny's layout at 1/6 the width; 200 encoder positions = 4 s of audio
    # (the real 1500 = 30 s), so a test step encodes 400 mel frames instead of 3000.
    "tiny": dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=200,
        max_target_positions=448,
    ),
}

# Whisper's specials in its own order: the tokenizer derives a language's id as
# `id(<|startoftranscript|>) + 1 + index in LANGUAGES`, so the language tokens must follow it.
SPECIALS = (
    ["<|endoftext|>", "<|startoftranscript|>"]
    + [f"<|{code}|>" for code in LANGUAGES]
    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
)


def byte_level_whisper_tokenizer(max_length: int = 448) -> WhisperTokenizer:
    """Whisper's tokenizer class over 256 byte tokens + its specials: no vocab file, ids stable everywhere.

    transformers 5 builds `WhisperTokenizer` from an in-memory vocab, so it is the real class (prefix
    tokens, decode, save/load) with an empty merge list: every byte is one token.
    """
    vocab = byte_vocab(tail=SPECIALS)  # bytes, then Whisper's specials in Whisper's order
    return WhisperTokenizer(
        vocab=vocab,
        merges=[],
        pad_token="<|endoftext|>",  # as the published checkpoints: pad = eos = unk = <|endoftext|>
        extra_special_tokens=SPECIALS[1:],
        language=LANGUAGE,
        task=TASK,
        model_max_length=max_length,
    )


def _chunk_seconds(max_source_positions: int) -> int:
    """Seconds of audio the encoder takes: its positions x 2 mel frames x hop / rate (1500 -> 30 s)."""
    samples = 2 * max_source_positions * HOP_LENGTH
    if samples % SAMPLING_RATE:
        raise ValueError(
            f"max_source_positions={max_source_positions} is not a whole number of seconds of audio: "
            "use a multiple of 50 (50 positions = 1 s)"
        )
    return samples // SAMPLING_RATE


class Whisper(SpeechFamily):
    name = "whisper"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # encoder, decoder and cross attention
    # No `vision_tower`: a full finetune trains encoder and decoder alike, as HF's Whisper fine-tuning
    # recipe does (model.freeze_vision_tower is refused for this family).

    # ---- loading -------------------------------------------------------------------------------
    def load_model(self, cfg: ModelConfig) -> nn.Module:
        comp = cfg.transformer
        if comp.pretrained:
            model = from_pretrained(WhisperForConditionalGeneration, comp, "transformer")
        else:
            preset = pick_preset(comp, MODEL_PRESETS, "transformer")
            tok = byte_level_whisper_tokenizer(preset["max_target_positions"])
            eot, sot = tok.eos_token_id, tok.convert_tokens_to_ids("<|startoftranscript|>")
            config = WhisperConfig(
                vocab_size=len(tok),
                pad_token_id=eot,
                bos_token_id=eot,
                eos_token_id=eot,
                decoder_start_token_id=sot,
                begin_suppress_tokens=[eot],  # no empty transcript (the default names GPT-2-vocab ids)
                suppress_tokens=[],
                **preset,
            )
            with seeded_init(cfg.seed):
                model = WhisperForConditionalGeneration(config)
            self._whisper_generation_config(model, tok)
        limit = model.config.max_target_positions
        if cfg.max_text_length > limit:
            raise ValueError(
                f"model.max_text_length={cfg.max_text_length} exceeds Whisper's {limit} decoder positions; "
                f"set model.max_text_length <= {limit}"
            )
        return model

    @staticmethod
    def _whisper_generation_config(model: WhisperForConditionalGeneration, tok: WhisperTokenizer) -> None:
        """The fields Whisper's `generate` reads to build `<|startoftranscript|> <|en|> <|transcribe|> ...`.

        A fresh GenerationConfig, not the one derived from the model config: a derived one is saved
        as `_from_model_config` and its Whisper-only fields are dropped again on load.
        """
        c = model.config
        model.generation_config = GenerationConfig(
            decoder_start_token_id=c.decoder_start_token_id,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
            begin_suppress_tokens=c.begin_suppress_tokens,
            suppress_tokens=c.suppress_tokens,
            max_length=c.max_target_positions,
            lang_to_id={f"<|{code}|>": tok.convert_tokens_to_ids(f"<|{code}|>") for code in LANGUAGES},
            task_to_id={task: tok.convert_tokens_to_ids(f"<|{task}|>") for task in TASK_IDS},
            no_timestamps_token_id=tok.convert_tokens_to_ids("<|notimestamps|>"),
            is_multilingual=True,
            language=LANGUAGE,
            task=TASK,
        )

    def load_processor(self, cfg: ModelConfig) -> WhisperProcessor:
        comp = cfg.transformer
        if comp.pretrained:
            return from_pretrained(WhisperProcessor, comp, "transformer")
        preset = pick_preset(comp, MODEL_PRESETS, "transformer")
        features = WhisperFeatureExtractor(
            feature_size=preset["num_mel_bins"],
            sampling_rate=SAMPLING_RATE,
            hop_length=HOP_LENGTH,
            chunk_length=_chunk_seconds(preset["max_source_positions"]),  # pads/cuts to the encoder's frames
        )
        return WhisperProcessor(feature_extractor=features, tokenizer=byte_level_whisper_tokenizer())

    # ---- encoding (prep) ------------------------------------------------------------------------
    def _features(self, processor: WhisperProcessor, sample: SequenceSample) -> torch.Tensor:
        """A sample's audio -> log-mel (num_mel_bins, frames), padded to the encoder's fixed length."""
        fe = processor.feature_extractor
        if sample.audio is None:
            raise ValueError(
                "no audio: a whisper sample needs its decoded audio (flowspeed.datasets_prep.audio.load_audio)"
            )
        if sample.sampling_rate != fe.sampling_rate:
            raise ValueError(
                f"audio at {sample.sampling_rate} Hz, Whisper takes {fe.sampling_rate} Hz: decode it with "
                f"flowspeed.datasets_prep.audio.load_audio(path, {fe.sampling_rate})"
            )
        audio = np.asarray(sample.audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio must be non-empty mono (N,) samples, got shape {audio.shape}")
        if audio.size > fe.n_samples:
            raise ValueError(
                f"{audio.size / fe.sampling_rate:.1f} s of audio, the model hears at most {fe.chunk_length} s: "
                "split the recording (and its transcript) into shorter segments"
            )
        out = fe(audio, sampling_rate=fe.sampling_rate, return_tensors="pt")
        return out["input_features"][0]  # (num_mel_bins, frames)

    def encode_sample(self, processor: Any, sample: SequenceSample, max_length: int) -> dict[str, torch.Tensor]:
        """audio -> `input_features` (80, frames); transcript -> `labels` (L,), all of them trained.

        No `input_ids`: Whisper's forward has no such argument (the decoder's inputs are the shifted
        labels), and caching only what the forward takes keeps `training_loss` the shared one.
        """
        features = self._features(processor, sample)
        text = sample.text.strip()
        if not text:
            raise ValueError("empty transcript: a speech sample needs its text")
        tok = processor.tokenizer
        # Template: [<|startoftranscript|>, lang, task, <|notimestamps|>] + text + [<|endoftext|>].
        # split_special_tokens: a transcript that spells "<|en|>" is text, not a control token.
        ids = tok(text, split_special_tokens=True)["input_ids"]
        if ids and ids[0] == tok.convert_tokens_to_ids("<|startoftranscript|>"):
            ids = ids[1:]  # the forward prepends it (decoder_start_token_id) when shifting right
        if len(ids) > max_length:
            raise ValueError(
                f"transcript is {len(ids)} tokens, more than model.max_text_length={max_length}: "
                "split the sample or raise model.max_text_length"
            )
        return {"input_features": features, "labels": torch.tensor(ids, dtype=torch.long)}

    # ---- training -------------------------------------------------------------------------------
    def bucket_key(self, record: dict[str, Any]) -> Any:
        """One bucket, not one per transcript length: features have the encoder's fixed shape, labels pad."""
        return tuple(record["shapes"]["input_features"])

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "input_features": torch.stack([it["input_features"] for it in items]),  # (B, 80, frames)
            # (B, L_max): padding is ignored by the loss; the forward turns it into pad in decoder_input_ids
            "labels": pad_sequence([it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX),
        }

    def sample_tokens(self, transformer_config: Any, record: dict[str, Any]) -> int:
        """Positions the model computes on: encoder positions (mel frames / 2) + decoder tokens.

        The encoder's share dominates (1500 positions vs tens of transcript tokens for real Whisper),
        so counting only transcript tokens would put MFU an order of magnitude low. The engine's
        6 x params x tokens charges each position for both stacks, so the figure errs high instead.
        """
        shapes = record["shapes"]
        return int(shapes["input_features"][-1]) // 2 + int(shapes["labels"][0])

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def respond(
        self, pretrained_dir: Path, samples: list[SequenceSample], *, max_new_tokens: int, device: torch.device
    ) -> list[str]:
        """Greedy transcripts, prompted as in training (the tokenizer's language and task)."""
        processor = loaded(lambda: WhisperProcessor.from_pretrained(pretrained_dir), pretrained_dir, "processor")
        model = loaded(lambda: WhisperForConditionalGeneration.from_pretrained(pretrained_dir).to(device).eval(),
                       pretrained_dir, device)  # fmt: skip
        tok = processor.tokenizer
        prompt = {k: v for k, v in (("language", tok.language), ("task", tok.task)) if v is not None}
        # generate refuses prompt + new tokens beyond the decoder's positions
        max_new = min(max_new_tokens, model.config.max_target_positions - len(tok.prefix_tokens))
        out: list[str] = []
        for start in range(0, len(samples), 8):
            feats = torch.stack([self._features(processor, s) for s in samples[start : start + 8]])  # (B, 80, T)
            ids = model.generate(
                input_features=feats.to(device, model.dtype),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                **prompt,
            )
            out.extend(processor.batch_decode(ids, skip_special_tokens=True))
        return out


register_family(Whisper())
