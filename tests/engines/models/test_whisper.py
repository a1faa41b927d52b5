"""Whisper speech family and PyAV audio decoding, on a seeded tiny preset and generated tones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import flowspeed.engines.models.whisper  # noqa: F401  (registers the family)
import numpy as np
import pytest
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.datasets_prep.audio import load_audio
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX, SequenceSample

SR = 16000


def write_tone(path: Path, freq: float, seconds: float, rate: int = 22050, video: bool = False) -> Path:
    """A sine tone, stereo at `rate`: wav (pcm_s16le), or an mp4 with an mpeg4 video track and AAC sound."""
    n = int(rate * seconds)
    tone = (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate) * 32767).astype(np.int16)
    interleaved = np.stack([tone, tone], axis=1).reshape(1, -1)  # packed s16 stereo: (1, 2n)
    with av.open(str(path), "w") as out:
        if video:
            vs = out.add_stream("mpeg4", rate=10)
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        st = out.add_stream("aac" if video else "pcm_s16le", rate=rate, layout="stereo")
        if video:
            for i in range(int(seconds * 10)):
                img = np.full((32, 32, 3), i * 20 % 255, np.uint8)
                out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(vs.encode(None))
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
        frame.sample_rate = rate
        out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def write_silent_video(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        out.mux(vs.encode(None))
    return path


def peak_hz(audio: np.ndarray, rate: int = SR) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(audio))) * rate / len(audio))


# ---- audio decoding -----------------------------------------------------------------------------
def test_load_audio_resamples_stereo_22k_to_mono_16k(tmp_path: Path) -> None:
    audio = load_audio(write_tone(tmp_path / "tone.wav", 440.0, 1.0), SR)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SR) <= 2  # 1 s at 16 kHz
    assert peak_hz(audio) == pytest.approx(440.0, abs=2.0)
    assert 0.2 < np.abs(audio).max() <= 1.0


def test_load_audio_reads_a_videos_sound_track(tmp_path: Path) -> None:
    audio = load_audio(write_tone(tmp_path / "clip.mp4", 1000.0, 1.0, video=True), SR)
    assert abs(len(audio) - SR) < 0.1 * SR  # AAC adds priming/padding samples
    assert peak_hz(audio) == pytest.approx(1000.0, abs=5.0)


def test_load_audio_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match=r"silent\.mp4 has no audio stream \(video\)"):
        load_audio(write_silent_video(tmp_path / "silent.mp4"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 64)
    with pytest.raises(ValueError, match="could not decode audio from .*bad.wav.*re-encode"):
        load_audio(bad)


# ---- the family -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family():
    return get_family("whisper")


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig(family="whisper")


@pytest.fixture(scope="module")
def processor(family, cfg):
    return family.load_processor(cfg)


def tone_sample(freq: float, seconds: float, text: str) -> SequenceSample:
    t = np.arange(int(SR * seconds)) / SR
    return SequenceSample(audio=(0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), text=text)


SAMPLES = [tone_sample(440.0, 1.0, "a low tone"), tone_sample(1200.0, 0.5, "high!")]


def test_encode_sample_shapes_and_labels(family, processor) -> None:
    enc = family.encode_sample(processor, SAMPLES[0], max_length=64)
    assert set(enc) == {"input_features", "labels"}
    assert enc["input_features"].shape == (80, 400)  # the tiny encoder's 4 s at 100 frames/s
    tok = processor.tokenizer
    labels = enc["labels"].tolist()
    assert tok.convert_ids_to_tokens(labels[:3]) == ["<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(labels, skip_special_tokens=True) == "a low tone"
    # a transcript that spells a control token stays text
    spelled = family.encode_sample(processor, tone_sample(440.0, 0.2, "say <|en|>"), max_length=64)["labels"]
    assert tok.decode(spelled, skip_special_tokens=True) == "say <|en|>"


def test_encode_sample_rejects_unusable_samples(family, processor) -> None:
    with pytest.raises(ValueError, match="16000 Hz"):
        at_8k = SequenceSample(audio=np.zeros(800, np.float32), sampling_rate=8000, text="x")
        family.encode_sample(processor, at_8k, 64)
    with pytest.raises(ValueError, match="at most 4 s"):
        family.encode_sample(processor, tone_sample(440.0, 5.0, "too long"), 64)
    with pytest.raises(ValueError, match="max_text_length=4"):
        family.encode_sample(processor, SAMPLES[0], 4)
    with pytest.raises(ValueError, match="empty transcript"):
        family.encode_sample(processor, tone_sample(440.0, 0.2, "  "), 64)


def test_collate_pads_labels_and_counts_tokens(family, processor) -> None:
    items = [family.encode_sample(processor, s, 64) for s in SAMPLES]
    batch = family.collate(items)
    assert batch["input_features"].shape == (2, 80, 400)
    n0, n1 = len(items[0]["labels"]), len(items[1]["labels"])
    assert batch["labels"].shape == (2, max(n0, n1))
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    record = {"shapes": {k: list(v.shape) for k, v in items[0].items()}}
    assert family.sample_tokens(None, record) == 200 + n0  # encoder positions + decoder tokens
    other = {"shapes": {k: list(v.shape) for k, v in items[1].items()}}
    assert family.bucket_key(record) == family.bucket_key(other)  # transcript length does not split batches


def test_tiny_whisper_learns_saves_and_transcribes(family, cfg, processor, tmp_path: Path) -> None:
    model = family.load_model(cfg)
    batch = family.collate([family.encode_sample(processor, s, 64) for s in SAMPLES])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(20):
        loss = family.training_loss(model, None, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    out = family.save_pretrained(tmp_path / "final", cfg, model)
    reloaded_cfg = cfg.model_copy(update={"transformer": ComponentConfig(preset=None, pretrained=str(out))})
    reloaded = family.load_model(reloaded_cfg)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert family.load_processor(reloaded_cfg).tokenizer.prefix_tokens == processor.tokenizer.prefix_tokens

    texts = family.respond(out, SAMPLES, max_new_tokens=12, device=torch.device("cpu"))
    assert len(texts) == len(SAMPLES) and all(isinstance(t, str) for t in texts)


def test_seeded_preset_is_reproducible(family, cfg) -> None:
    a, b = family.load_model(cfg), family.load_model(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_tiny_tokenizer_ids_are_the_same_in_every_process() -> None:
    """Labels are cached by prep and read by training and eval in other processes: ids must not move."""
    code = (
        "from flowspeed.engines.models.whisper import byte_level_whisper_tokenizer as t; "
        "print(t()('a red circle, naïve').input_ids)"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    assert len(outs) == 1 and outs.pop().strip().startswith("[")
