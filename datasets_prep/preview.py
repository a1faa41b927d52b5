"""What prep selected and what it rejected, as pictures: a contact sheet and the rows of MLflow tables.

    flowspeed prep configs/quickstart.yaml --preview 8   # the first 8 manifest records: probe, bucket, 3 frames

A curator should see which clips, captions, buckets and scores went in without reading JSONL. Each
sample is one tile: its first, middle and last sampled frame (cropped to its bucket's aspect, as
training sees them), its caption, bucket, frame count, source size and curation scores. An image is
one frame. A sample with no pictures (a speech clip, a file that no longer decodes) still gets its
tile, with the reason in place of the frames, so the sheet has exactly one tile per sample. Rejects
are rows (source, stage, code, reason), not tiles: most of them never decoded; the first MAX_REJECTS.

Kept cheap, since it runs after every prep: 3 small decodes per sample (scaled in the decoder), at
most `limit` samples (the first, in manifest order; samples.jsonl and rejects.jsonl are the full
lists), `per_sheet` tiles per PNG page. Outputs (one folder, replaced whole, `render` below):
    contact_sheet.png, contact_sheet_2.png, ...   the pages
    thumbs/<key>.png                              one strip of frames per sample (the table's pictures)
    preview.json                                  layout and rows, and the inputs' digests: a rerun on
                                                  unchanged prep outputs decodes nothing
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.decode import cover_size, decode, resize_center_crop
from flowspeed.datasets_prep.manifest import Entry, Rejection, opened_under, read_sources
from flowspeed.datasets_prep.probe import MediaInfo, probe
from flowspeed.engines.common.io import atomic_write_text, file_digest, read_jsonl, replaced_dir
from PIL import Image, ImageDraw, ImageFont

THUMB = 96  # longest side of one frame's thumbnail, px
PAD = 4
LINE_H = 12
TEXT_LINES = 4  # caption (2 lines), bucket/frames/size, scores
TILE_W = 3 * THUMB + 4 * PAD
TILE_H = THUMB + 3 * PAD + TEXT_LINES * LINE_H
COLUMNS = 4
SCORES = ("aesthetic", "motion")  # curation scores prep merges into each sample record
MAX_REJECTS = 1000  # rows of the rejects table (rejects.jsonl, logged beside it, has them all)
VERSION = 1  # of the layout: a new one re-renders what an older one left


@dataclass
class Tile:
    key: str
    page: int  # index into Preview.pages
    box: tuple[int, int, int, int]  # (left, top, right, bottom) on its page
    frames: int  # frame thumbnails drawn; 0: a text tile (the reason is written in place of the frames)


@dataclass
class Preview:
    out_dir: Path
    pages: list[Path]
    tiles: list[Tile]
    samples: list[dict[str, Any]]  # table rows; "thumbnail" is the strip's path
    rejects: list[dict[str, Any]]  # table rows: source, stage, code, reason
    total_samples: int = 0  # before `limit`
    stamp: dict[str, Any] = field(default_factory=dict)


# ---- frames -------------------------------------------------------------------------------------------


def _picks(indices: list[int]) -> list[int]:
    """First, middle and last of the sampled frames, each once (an image's repeats collapse to one)."""
    if not indices:
        return []
    return sorted({indices[0], indices[len(indices) // 2], indices[-1]})


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    scale = THUMB / max(height, width, 1)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _info_of(record: dict[str, Any]) -> MediaInfo | None:
    """The source's MediaInfo from the fields prep recorded (no probe), or None for a record without them."""
    if "src_size" not in record or "frame_indices" not in record:
        return None
    w, h = record["src_size"]
    return MediaInfo(
        record["source"], record["kind"], w, h, record.get("src_fps") or 0.0, record.get("src_frames") or 1,
        record.get("duration") or 0.0, record.get("codec", ""), record.get("rotation") or 0,
        record.get("container", ""), bool(record.get("vfr")),
    )  # fmt: skip


def sample_frames(record: dict[str, Any], decoder: str = "pyav", roots: Iterable[Path] = ()) -> np.ndarray:
    """(T<=3, h, w, 3) uint8: the first, middle and last sampled frame, at most THUMB px on a side.

    A prep record (samples.jsonl, or a planned one in a preview) names its frames and bucket: those
    frames, centre-cropped to the bucket's aspect. A sequence family's record (conversations, speech)
    has media files only: the first file's first, middle and last frame, uncropped. Opened under
    `roots` as prep opens them (a file swapped for a symlink out of them since is refused); raises
    (ProbeError, EscapedRoot, ...) for a sample with no pictures: the caller draws a text tile."""
    info = _info_of(record)
    if info is None:
        media = record.get("media") or [record["source"]]
        info = probe(Path(media[0]))  # an audio file raises no_video here
        indices = list(range(info.num_frames)) if info.kind == "video" else [0]
        h, w = _thumb_size(info.height, info.width)
    else:
        indices = record["frame_indices"]
        _, bh, bw = record["bucket"]
        h, w = _thumb_size(bh, bw)
    size = cover_size(info.height, info.width, h, w)  # scaled in the decoder: a thumbnail never decodes full size
    with opened_under(Path(info.path), tuple(roots)) as path:
        frames, _ = decode(replace(info, path=str(path)), _picks(indices), decoder, size)
    return resize_center_crop(frames, h, w).numpy()


def strip(frames: np.ndarray) -> Image.Image:
    """Frames side by side with a PAD gap: one sample's picture in the MLflow table."""
    t, h, w = frames.shape[:3]
    out = Image.new("RGB", (t * w + (t - 1) * PAD, h), (24, 24, 24))
    for i, f in enumerate(frames):
        out.paste(Image.fromarray(f), (i * (w + PAD), 0))
    return out


# ---- text ---------------------------------------------------------------------------------------------


def caption_of(record: dict[str, Any]) -> str:
    """The caption, or for a conversation its turns' text (what the model learns from)."""
    if record.get("caption"):
        return str(record["caption"])
    if record.get("text"):
        return str(record["text"])
    return " / ".join(str(t.get("content", "")) for t in record.get("messages") or [])


def _bucket(record: dict[str, Any]) -> str:
    b = record.get("bucket")
    return "x".join(str(n) for n in b) if b else ""


def _size(record: dict[str, Any]) -> str:
    s = record.get("src_size")
    return f"{s[0]}x{s[1]}" if s else ""


def table_row(record: dict[str, Any], thumbnail: Path) -> dict[str, Any]:
    """One sample as a row of the MLflow samples table (score columns only where prep scored)."""
    row = {
        "key": record["key"], "caption": caption_of(record), "bucket": _bucket(record),
        "frames": record.get("num_frames"), "size": _size(record), "kind": record.get("kind", ""),
        "source": record.get("source", ""),
    }  # fmt: skip
    row |= {s: round(float(record[s]), 4) for s in SCORES if record.get(s) is not None}
    return {**row, "thumbnail": str(thumbnail)}


def reject_row(reject: dict[str, Any]) -> dict[str, Any]:
    return {"source": reject.get("path", ""), "stage": reject.get("stage", ""), "code": reject.get("code", ""),
            "reason": reject.get("reason", "")}  # fmt: skip


# ---- drawing ------------------------------------------------------------------------------------------


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _fit(text: str, chars: int, lines: int) -> list[str]:
    return textwrap.wrap(text, chars, max_lines=lines, placeholder=" …") or [""]


def _draw_tile(record: dict[str, Any], frames: np.ndarray | None, why: str) -> Image.Image:
    """One sample's tile: frames in THUMB cells (or the reason there is none), then four lines of text."""
    font = _font()
    tile = Image.new("RGB", (TILE_W, TILE_H), (32, 32, 32))
    draw = ImageDraw.Draw(tile)
    chars = max(8, int((TILE_W - 2 * PAD) / max(font.getlength("abcdefghijklmnopqrstuvwxyz") / 26, 1)))
    if frames is not None:
        for i, f in enumerate(frames):
            h, w = f.shape[:2]
            x = PAD + i * (THUMB + PAD) + (THUMB - w) // 2
            tile.paste(Image.fromarray(f), (x, PAD + (THUMB - h) // 2))
    else:
        draw.rectangle((PAD, PAD, TILE_W - PAD, PAD + THUMB), fill=(60, 40, 40))
        for i, line in enumerate(_fit(f"no frames: {why}", chars - 2, THUMB // LINE_H - 1)):
            draw.text((2 * PAD, 2 * PAD + i * LINE_H), line, fill=(240, 200, 200), font=font)
    y = 2 * PAD + THUMB
    info = [f"bucket {_bucket(record)}" if record.get("bucket") else record.get("kind", ""),
            f"{record.get('num_frames', '?')} frames", _size(record)]  # fmt: skip
    scores = " ".join(f"{s} {float(record[s]):.3g}" for s in SCORES if record.get(s) is not None)
    lines = [*_fit(caption_of(record), chars, 2)]
    lines += [""] * (2 - len(lines)) + [" · ".join(p for p in info if p), scores or f"key {record['key'][:16]}"]
    for i, line in enumerate(lines):
        draw.text((PAD, y + i * LINE_H), line, fill=(235, 235, 235) if i < 2 else (165, 165, 165), font=font)
    return tile


def _layout(n: int, per_sheet: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(page, box) of tile i: row-major, COLUMNS wide, `per_sheet` tiles a page."""
    out = []
    for i in range(n):
        page, j = divmod(i, per_sheet)
        r, c = divmod(j, COLUMNS)
        out.append((page, (c * TILE_W, r * TILE_H, (c + 1) * TILE_W, (r + 1) * TILE_H)))
    return out


def page_name(page: int) -> str:
    return "contact_sheet.png" if page == 0 else f"contact_sheet_{page + 1}.png"


# ---- render -------------------------------------------------------------------------------------------


def render(
    records: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    out_dir: Path,
    decoder: str = "pyav",
    roots: Iterable[Path] = (),
    limit: int = 128,
    per_sheet: int = 32,
    stamp: dict[str, Any] | None = None,
) -> Preview:
    """Draw the sheet pages and thumbnails of the first `limit` records into `out_dir` (replaced whole:
    readers see the old preview or the new one, never a mix) and return the layout and table rows."""
    if per_sheet < 1 or limit < 0:
        raise ValueError(f"per_sheet must be >= 1 and limit >= 0 (got {per_sheet}, {limit})")
    out_dir, shown = Path(out_dir).resolve(), records[:limit]
    places = _layout(len(shown), per_sheet)
    n_pages = max(1, math.ceil(len(shown) / per_sheet))
    tiles: list[Tile] = []
    rows: list[dict[str, Any]] = []
    with replaced_dir(out_dir) as tmp:
        (tmp / "thumbs").mkdir()
        sheets = []
        for page in range(n_pages):
            count = min(per_sheet, len(shown) - page * per_sheet)
            cols = min(COLUMNS, max(count, 1))
            sheets.append(Image.new("RGB", (cols * TILE_W, max(1, math.ceil(count / COLUMNS)) * TILE_H), (16, 16, 16)))
        for rec, (page, box) in zip(shown, places, strict=True):
            try:
                frames, why = sample_frames(rec, decoder, roots), ""
            except Exception as exc:  # noqa: BLE001 - one sample's missing pictures: its tile says why
                frames, why = None, f"{type(exc).__name__}: {exc}"
            sheets[page].paste(_draw_tile(rec, frames, why), box[:2])
            thumb = tmp / "thumbs" / f"{rec['key'][:32]}.png"
            (strip(frames) if frames is not None else _draw_tile(rec, None, why)).save(thumb)  # a table row's picture
            tiles.append(Tile(rec["key"], page, box, 0 if frames is None else len(frames)))
            rows.append(table_row(rec, out_dir / "thumbs" / thumb.name))
        pages = []
        for page, sheet in enumerate(sheets):
            sheet.save(tmp / page_name(page))
            pages.append(out_dir / page_name(page))
        preview = Preview(out_dir, pages, tiles, rows, [reject_row(r) for r in rejects[:MAX_REJECTS]],
                          len(records), stamp or {})  # fmt: skip
        atomic_write_text(tmp / "preview.json", json.dumps(_as_json(preview), indent=1, default=str))
    return preview


def _as_json(p: Preview) -> dict[str, Any]:
    return {"version": VERSION, "stamp": p.stamp, "total_samples": p.total_samples,
            "pages": [x.name for x in p.pages], "tiles": [asdict(t) for t in p.tiles],
            "samples": p.samples, "rejects": p.rejects}  # fmt: skip


def load(out_dir: Path) -> Preview | None:
    """The preview in `out_dir`, or None where there is none (or one of an older layout)."""
    path = Path(out_dir) / "preview.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != VERSION:
        return None
    out_dir = Path(out_dir).resolve()
    tiles = [Tile(t["key"], t["page"], tuple(t["box"]), t["frames"]) for t in data["tiles"]]
    # thumbnails where the folder is now (a workdir may have moved since it was drawn)
    rows = [{**r, "thumbnail": str(out_dir / "thumbs" / Path(r["thumbnail"]).name)} for r in data["samples"]]
    return Preview(out_dir, [out_dir / n for n in data["pages"]], tiles, rows, data["rejects"],
                   data["total_samples"], data["stamp"])  # fmt: skip


def render_prep(prep_dir: Path, decoder: str = "pyav", roots: Iterable[Path] = (), limit: int = 128) -> Preview:
    """The preview of a finished prep (samples.jsonl with its scores, rejects.jsonl), in `<prep_dir>/preview`.
    Unchanged outputs (same file digests, same limit) reuse the preview there: a cached prep decodes nothing."""
    prep_dir = Path(prep_dir)
    samples, rejects = prep_dir / "samples.jsonl", prep_dir / "rejects.jsonl"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} does not exist: run `flowspeed prep` first")
    stamp = {"samples": file_digest(samples), "rejects": file_digest(rejects) if rejects.is_file() else "",
             "limit": limit}  # fmt: skip
    out = prep_dir / "preview"
    old = load(out)
    if old is not None and old.stamp == stamp and all(f.is_file() for f in _files(old)):
        return old
    return render(read_jsonl(samples), read_jsonl(rejects), out, decoder, roots, limit, stamp=stamp)


def _files(p: Preview) -> list[Path]:
    return [*p.pages, *(Path(r["thumbnail"]) for r in p.samples)]


def media_roots(cfg: PipelineConfig) -> tuple[Path, ...]:
    """Where the manifest reader lets media be: the manifest's folder (or the folder manifest itself),
    data.incoming, data.roots. Thumbnails of prep outputs are opened under these, as prep opened them."""
    m = Path(cfg.data.manifest).resolve()
    roots = [m if m.is_dir() else m.parent, *(Path(r).resolve() for r in cfg.data.roots)]
    if cfg.data.incoming is not None:
        roots.append(Path(cfg.data.incoming).resolve())
    return tuple(roots)


def preview_manifest(cfg: PipelineConfig, n: int, out_dir: Path | None = None) -> Preview:
    """The first `n` manifest records as prep would take them (probe, checks, bucket, frame sampling),
    without encoding: no VAE or text encoder is loaded, no latent is written, no score is computed (scorers
    are models; a preview shows the scores a prep has merged), and records without a caption are rejected
    as no_caption (the captioner is a model too). Written to `<prep_dir>/manifest_preview` unless `out_dir`."""
    from flowspeed.datasets_prep.prep import _plan  # the plan prep itself makes, so the preview cannot drift
    from flowspeed.engines.models import get_family
    from flowspeed.engines.models.registry import Capability

    if n < 1:
        raise ValueError(f"--preview takes a number of records >= 1 (got {n})")
    d = cfg.data
    items = list(islice(read_sources(d.manifest, d.manifest_format, d.roots, d.incoming), n))
    family = get_family(cfg.model.family)
    rejects: list[Rejection] = []
    if family.can(Capability.TOKEN_LOSS):  # conversations and speech: media files, no buckets
        records = []
        for item in items:
            if isinstance(item, Rejection):
                rejects.append(item)
                continue
            records.append(_sequence_record(item, family.kind))
    else:
        _, pending = _plan(cfg, family, items, {}, rejects)
        records = [p.record for p in pending]
    out = Path(out_dir) if out_dir is not None else cfg.prep_dir / "manifest_preview"
    return render(records, [r.as_row() for r in rejects], out, d.decoder, media_roots(cfg), limit=n)


def _sequence_record(item: Entry, kind: str) -> dict[str, Any]:
    from flowspeed.engines.common.io import text_digest

    media = [str(p) for p in (item.media or (item.path,))]
    return {"key": text_digest(*media, item.caption or "", str(item.line)), "source": str(item.path),
            "media": media, "caption": item.caption, "messages": item.meta.get("messages"), "kind": kind,
            "manifest_line": item.line}  # fmt: skip
