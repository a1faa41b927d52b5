"""Every ingest format round-trips a fixture written here; escaping paths are refused unread."""

import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flowspeed.datasets_prep.manifest import Entry, Rejection, detect_format, known_formats, read_manifest

ROWS = [("videos/a.mp4", "a red circle"), ("videos/b.mp4", "a blue square"), ("images/c.png", "a still")]


@pytest.fixture
def media(tmp_path: Path) -> Path:
    for rel, _ in ROWS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path.parent / "secret.mp4").write_bytes(b"x")
    return tmp_path


def _entries(items: list) -> list[tuple[str, str | None]]:
    return [(str(e.path), e.caption) for e in items if isinstance(e, Entry)]


def _expected(root: Path) -> list[tuple[str, str]]:
    return [(str((root / rel).resolve()), cap) for rel, cap in ROWS]


def _write(fmt: str, root: Path, rows: list[dict]) -> Path:
    if fmt in ("cogvideox", "jsonl"):
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = root / "data.json"
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path = root / "data.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path = root / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("fmt", "keys"),
    [
        ("cogvideox", ("file", "captions")),
        ("jsonl", ("path", "caption")),
        ("json", ("video", "text")),
        ("csv", ("path", "caption")),
        ("parquet", ("file", "cap")),
    ],
)
def test_tables_round_trip_and_are_detected(media: Path, fmt: str, keys: tuple[str, str]) -> None:
    rows = [{keys[0]: rel, keys[1]: cap, "aes": 5.5} for rel, cap in ROWS]
    rows.append({keys[0]: "../secret.mp4", keys[1]: "escapes"})
    path = _write(fmt, media, rows)
    assert detect_format(path) == fmt
    items = list(read_manifest(path))
    assert _entries(items) == _expected(media)
    assert [e.meta.get("aes") in (5.5, "5.5") for e in items if isinstance(e, Entry)] == [True] * 3
    (rej,) = [i for i in items if isinstance(i, Rejection)]
    assert "escapes" in rej.reason and "record 4" in rej.reason


def test_folder_with_sidecar_captions(media: Path) -> None:
    for rel, cap in ROWS:
        (media / rel).with_suffix(".txt").write_text(cap + "\n")
    os.symlink(media.parent / "secret.mp4", media / "videos" / "link.mp4")  # a symlink out of the root
    items = list(read_manifest(media))
    assert detect_format(media) == "folder"
    assert sorted(_entries(items)) == sorted(_expected(media))
    (rej,) = [i for i in items if isinstance(i, Rejection)]
    assert rej.path.endswith("link.mp4") and "escapes" in rej.reason


def test_opensora_plan_data_txt(media: Path) -> None:
    ann = media / "anno.json"
    ann.write_text(
        json.dumps(
            [
                {
                    "path": rel,
                    "cap": [cap, "alt"],
                    "resolution": {"height": 64, "width": 96},
                    "fps": 24,
                    "num_frames": 48,
                    "aes": 5.1,
                    "cut": [0, 40],
                }
                for rel, cap in ROWS
            ]
        )
    )
    txt = media / "data.txt"
    txt.write_text(f"{media},{ann}\n")
    assert detect_format(txt) == "opensora_plan"
    items = list(read_manifest(txt))
    assert _entries(items) == _expected(media)
    assert items[0].meta["resolution"] == {"height": 64, "width": 96} and items[0].meta["cut"] == [0, 40]


def test_sharegpt_conversations_check_placeholder_counts(media: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "A still."},
            ],
            "images": ["images/c.png"],
        },
        {
            "conversations": [{"from": "human", "value": "<video><video>Compare."}, {"from": "gpt", "value": "Same."}],
            "videos": ["videos/a.mp4", "videos/b.mp4"],
        },
        {"messages": [{"role": "user", "content": "<image><image>Two?"}], "images": ["images/c.png"]},
        {"messages": [{"role": "user", "content": "<image>Out?"}], "images": ["../secret.mp4"]},
    ]
    path = media / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(path) == "sharegpt"
    items = list(read_manifest(path))
    ok = [i for i in items if isinstance(i, Entry)]
    assert [len(e.media) for e in ok] == [1, 2]
    assert ok[1].media == ((media / "videos/a.mp4").resolve(), (media / "videos/b.mp4").resolve())
    assert ok[0].meta["messages"][1]["content"] == "A still."
    reasons = [i.reason for i in items if isinstance(i, Rejection)]
    assert "2 <image> placeholders but 1 images" in reasons[0] and "escapes" in reasons[1]


def test_audio_transcripts(media: Path) -> None:
    (media / "clip.wav").write_bytes(b"RIFF")
    path = media / "speech.jsonl"
    path.write_text(json.dumps({"audio": "clip.wav", "text": "hello world", "duration": 1.2}) + "\n")
    assert detect_format(path) == "audio"
    (e,) = list(read_manifest(path))
    assert e.path == (media / "clip.wav").resolve() and e.caption == "hello world" and e.meta["duration"] == 1.2


def test_unknown_format_lists_the_known_ones(media: Path) -> None:
    path = _write("jsonl", media, [{"file": "videos/a.mp4", "caption": "x"}])
    with pytest.raises(ValueError, match="known formats: audio, cogvideox, csv, folder, json, jsonl"):
        list(read_manifest(path, "webdataset"))
    assert set(known_formats()) >= {"opensora_plan", "sharegpt", "parquet"}
