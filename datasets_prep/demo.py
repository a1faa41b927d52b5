"""A small, honest dataset made on the spot: coloured shapes moving, with captions that say so.

Mixed sizes, aspect ratios, fps and durations exercise probing, sampling and resizing; a few
stills exercise the image path. No downloads, deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flowspeed.datasets_prep.mp4 import write_mp4
from flowspeed.engines.common.io import atomic_write, atomic_write_text
from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 50, 200),
}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (110, 110, 110), "dark blue": (10, 20, 70)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {
    "from left to right": ((0.15, 0.5), (0.85, 0.5)),
    "from right to left": ((0.85, 0.5), (0.15, 0.5)),
    "from top to bottom": ((0.5, 0.15), (0.5, 0.85)),
    "from bottom to top": ((0.5, 0.85), (0.5, 0.15)),
    "diagonally from top left to bottom right": ((0.15, 0.15), (0.85, 0.85)),
}
# (width, height, fps, seconds): landscape, portrait, square; 8 to 30 fps; 1.5 to 3 s.
SIZES = [
    (96, 64, 24, 2.0),
    (64, 96, 30, 1.5),
    (80, 80, 12, 3.0),
    (128, 72, 25, 2.0),
    (72, 128, 8, 3.0),
    (112, 64, 15, 2.0),
    (64, 64, 20, 2.5),
    (160, 96, 10, 3.0),
]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def render_clip(shape: str, colour: str, background: str, motion: str, w: int, h: int, n: int) -> np.ndarray:
    (x0, y0), (x1, y1) = MOTIONS[motion]
    r = 0.16 * min(w, h)
    frames = []
    for i in range(n):
        a = i / max(n - 1, 1)
        img = Image.new("RGB", (w, h), BACKGROUNDS[background])
        _draw(ImageDraw.Draw(img), shape, (x0 + a * (x1 - x0)) * w, (y0 + a * (y1 - y0)) * h, r, COLOURS[colour])
        frames.append(np.asarray(img))
    return np.stack(frames)


def make_demo_dataset(out_dir: Path, num_videos: int = 16, num_images: int = 4, seed: int = 0) -> Path:
    """Write clips, stills and `data.jsonl`; returns the manifest path."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_videos):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        w, h, fps, secs = SIZES[i % len(SIZES)]
        frames = render_clip(shape, colour, background, motion, w, h, int(round(fps * secs)))
        name = f"videos/clip_{i:03d}.mp4"
        write_mp4(out_dir / name, frames, fps)
        rows.append({"file": name, "captions": f"a {colour} {shape} moving {motion} on a {background} background"})
    for i in range(num_images):
        shape, colour = SHAPES[(i + 1) % len(SHAPES)], list(COLOURS)[i % len(COLOURS)]
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        img = Image.new("RGB", (96, 80), BACKGROUNDS[background])
        _draw(ImageDraw.Draw(img), shape, 48, 40, 14, COLOURS[colour])
        name = f"images/still_{i:03d}.png"
        atomic_write(out_dir / name, lambda p, img=img: img.save(p, format="PNG"))
        rows.append({"file": name, "captions": f"a still {colour} {shape} in the centre of a {background} background"})
    manifest = out_dir / "data.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    write_conversations(out_dir, rows)
    write_preferences(out_dir, rows)
    write_image_pairs(out_dir, rows)
    return manifest


def write_conversations(out_dir: Path, rows: list[dict]) -> Path:
    """`conversations.jsonl`: LLaVA/ShareGPT-style questions about the same clips and stills, whose
    answers the captions make true (the understanding families' demo data)."""
    convs = []
    for r in rows:
        kind = "image" if r["file"].startswith("images/") else "video"
        words = r["captions"].split()
        colour, shape = (words[2], words[3]) if words[1] == "still" else (words[1], words[2])
        convs.append({
            f"{kind}s": [r["file"]],
            "conversations": [
                {"from": "human", "value": f"<{kind}>\nWhat shape is shown?"},
                {"from": "gpt", "value": f"A {shape}."},
                {"from": "human", "value": "What colour is it?"},
                {"from": "gpt", "value": f"It is {colour}."},
            ],
        })  # fmt: skip
    path = Path(out_dir) / "conversations.jsonl"
    atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in convs))
    return path


def write_preferences(out_dir: Path, rows: list[dict]) -> Path:
    """`preferences.jsonl`: LLaMA-Factory's ShareGPT DPO layout on the same clips and stills (the VLMs' DPO demo
    data): the shape question, the true shape chosen; rejected, a wrong shape with a second, hallucinated one (as
    hallucination-preference sets such as RLHF-V and POVID make their rejected answers)."""
    pairs = []
    for r in rows:
        kind = "image" if r["file"].startswith("images/") else "video"
        words = r["captions"].split()
        shape = words[3] if words[1] == "still" else words[2]
        wrong, extra = (SHAPES[(SHAPES.index(shape) + k) % len(SHAPES)] for k in (1, 2))
        pairs.append({
            f"{kind}s": [r["file"]],
            "conversations": [{"from": "human", "value": f"<{kind}>\nWhat shape is shown?"}],
            "chosen": {"from": "gpt", "value": f"A {shape}."},
            "rejected": {"from": "gpt", "value": f"A {wrong} and a {extra}."},
        })  # fmt: skip
    path = Path(out_dir) / "preferences.jsonl"
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return path


def write_image_pairs(out_dir: Path, rows: list[dict]) -> Path:
    """`pairs.jsonl`: image preference pairs for the generation families' Diffusion-DPO demo: the still its caption
    describes chosen, the same scene with the next shape of SHAPES rejected (`pairs/`, at another size and aspect, so
    the prep's resize of the rejected side to the chosen one's bucket is exercised)."""
    (Path(out_dir) / "pairs").mkdir(parents=True, exist_ok=True)
    pairs = []
    for r in rows:
        if not r["file"].startswith("images/"):
            continue
        words, background = r["captions"].split(), r["captions"].split(" of a ")[1].removesuffix(" background")
        colour, shape = words[2], words[3]
        wrong, extra = (SHAPES[(SHAPES.index(shape) + k) % len(SHAPES)] for k in (1, 2))
        img = Image.new("RGB", (112, 80), BACKGROUNDS[background])
        _draw(ImageDraw.Draw(img), wrong, 56, 40, 14, COLOURS[colour])
        name = "pairs/" + Path(r["file"]).stem + "_rejected.png"
        atomic_write(Path(out_dir) / name, lambda p, img=img: img.save(p, format="PNG"))
        pairs.append({"caption": r["captions"], "chosen": r["file"], "rejected": name})
    path = Path(out_dir) / "pairs.jsonl"
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
    return path


TONES = {"a low tone": 220.0, "a middle tone": 440.0, "a high tone": 880.0}


def make_demo_audio(out_dir: Path, num_clips: int = 12, seconds: float = 1.0, rate: int = 22050) -> Path:
    """Sine tones (stereo, 22.05 kHz, so loading resamples) named by their pitch, and `audio.jsonl`
    with the name as transcript: the speech families' demo data."""
    import av

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_clips):
        text, freq = list(TONES.items())[i % len(TONES)]
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
        name = f"audio/tone_{i:03d}.wav"

        def encode(tmp: Path, wave: np.ndarray = wave) -> None:
            with av.open(str(tmp), "w", format="wav") as out:
                stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
                packed = np.stack([wave, wave], axis=1).reshape(1, -1)  # packed s16: L R L R ...
                frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
                frame.sample_rate = rate
                for packet in stream.encode(frame):
                    out.mux(packet)
                for packet in stream.encode(None):
                    out.mux(packet)

        atomic_write(out_dir / name, encode)
        rows.append({"audio": name, "text": text})
    manifest = out_dir / "audio.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest
