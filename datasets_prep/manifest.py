"""Manifest ingest: one streaming reader per format, registered by name, auto-detected.

Formats (``data.manifest_format``; ``auto`` detects from the path and the first record):
    cogvideox      JSONL ``{"file": ..., "captions": str | [str]}`` (CogVideoX / finetrainers)
    jsonl, json,   generic tables: a media column (file/path/video/image/audio) and a caption column
    csv, parquet   (caption/captions/cap/text); other columns are kept as metadata
    folder         a directory of media; captions from sidecar ``<name>.txt`` files
    opensora_plan  ``data.txt`` of ``<root>,<annotation.json>`` lines; records carry ``path``, ``cap``,
                   ``resolution``, ``fps``, ``num_frames``/``duration``, optional ``aes``, ``cut``
    sharegpt       LLaVA/ShareGPT conversations (``messages`` or ``conversations``) with ``images`` /
                   ``videos`` lists whose lengths must match the ``<image>``/``<video>`` placeholders
    audio          speech: an ``audio`` (or file/path) column and ``text``/``transcript``/``sentence``

A manifest of millions of lines must survive one bad line: malformed records become rejections
with their record number and the rest is read. Every media path resolves under the manifest's root
(or a declared root); one that escapes it (``..``, absolute elsewhere, a symlink out) is rejected
unread. The check is repeated on the file actually opened (`read_text_under`, `opened_under`): a
symlink swapped in between the check and the read is refused too.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEDIA_KEYS = ("file", "path", "video", "image", "media", "audio", "audio_filepath")
CAPTION_KEYS = ("captions", "caption", "cap", "text", "transcript", "sentence")
MEDIA_SUFFIXES = {
    ".mp4",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".m4v",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".m4a",
}


@dataclass
class Entry:
    line: int  # 1-based record number in its source file
    path: Path  # the primary media file
    caption: str | None
    media: tuple[Path, ...] = ()  # every media file of the sample (conversations may have several)
    meta: dict[str, Any] = field(default_factory=dict)  # format-specific: cut, aes, fps, messages, ...
    roots: tuple[Path, ...] = ()  # where its media may be: each open is checked against these (opened_under)


@dataclass(frozen=True)
class Rejection:
    path: str
    stage: str
    reason: str
    code: str = "invalid"  # the reason's category, counted per code in the prep summary

    def as_row(self) -> dict[str, str]:
        return {"path": self.path, "stage": self.stage, "reason": self.reason, "code": self.code}


Item = Entry | Rejection
Reader = Callable[[Path, tuple[Path, ...]], Iterator[Item]]


@dataclass(frozen=True)
class Format:
    name: str
    read: Reader
    detect: Callable[[Path, dict | None], bool]


_FORMATS: dict[str, Format] = {}


def register_format(name: str, detect: Callable[[Path, dict | None], bool]) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        _FORMATS[name] = Format(name, fn, detect)
        return fn

    return deco


def known_formats() -> list[str]:
    return sorted(_FORMATS)


# ---- helpers ------------------------------------------------------------------------------------


def resolve_under(raw: str, root: Path, extra_roots: tuple[Path, ...] = ()) -> Path | str:
    """The resolved path, or the reason it is refused.

    Symlinks (of the file and of every folder on the way) are followed before the containment check,
    so a link inside the dataset cannot hand out a file from elsewhere. A path that cannot be resolved
    at all (a symlink loop, a NUL byte) is a refusal too, never an exception that would sink the run.
    """
    if not raw or not isinstance(raw, str):
        return "empty or non-text path"
    allowed = (root.resolve(), *(r.resolve() for r in extra_roots))
    where = ", ".join(str(a) for a in allowed)
    try:
        path = (root / raw).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: symlink loop (Python < 3.13)
        return f"path {raw!r} cannot be resolved under {where}: {exc}"
    if any(path.is_relative_to(a) for a in allowed):
        return path
    return (
        f"path {raw!r} escapes the allowed roots: it resolves to {path}, outside {where}; "
        "move the file under the manifest's folder or add its folder to data.roots"
    )


class EscapedRoot(ValueError):
    """A file that was under the allowed roots when checked is not when opened: refused unread."""


def _fd_path(fd: int) -> Path | None:
    """The path of the file an open descriptor refers to, as the kernel knows it (Linux /proc), or None."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _open_checked(path: Path, allowed: Iterable[Path]) -> int:
    """A read-only descriptor of `path`, a file `resolve_under` accepted, after checking that the file it
    actually opened is still under `allowed` (see `read_text_under`). Raises EscapedRoot or OSError."""
    roots = tuple(Path(r).resolve() for r in allowed)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise EscapedRoot(f"{path} became a symlink after it was checked against the allowed roots") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        real = _fd_path(fd)
        if real is None:  # no /proc: the same file as the path's target now, and that target inside
            now = Path(path).resolve()
            same = os.stat(now)
            if (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
                raise EscapedRoot(f"{path} changed while it was being opened")
            real = now
        if not any(real.is_relative_to(r) for r in roots):
            where = ", ".join(str(r) for r in roots)
            raise EscapedRoot(f"{path} was swapped after its check: the file opened is {real}, outside {where}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text_under(path: Path, allowed: Iterable[Path]) -> str:
    """The text of `path`, a file `resolve_under` accepted, read only if the file actually opened is
    still under `allowed`.

    Checking a path and then opening it by name leaves a window in which a symlink swapped in (for
    the file, or for a folder on its way) points the open somewhere else. So the file is opened once,
    with O_NOFOLLOW (a final component that became a symlink fails to open), and the opened
    descriptor's own path (/proc/self/fd) is checked against the roots before a byte is read: what is
    read is what was checked. Where /proc is missing, the opened file's (device, inode) must equal that
    of the path resolved again, which narrows the window without closing it. O_NONBLOCK and the
    regular-file check keep a FIFO swapped in from blocking the prep. Raises EscapedRoot or OSError.
    """
    with open(_open_checked(path, allowed), "rb") as fh:  # the descriptor is closed with the file object
        return fh.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def opened_under(path: Path, allowed: Iterable[Path]) -> Iterator[Path]:
    """A path naming `path`'s file as opened and checked once (`read_text_under`), for readers that only
    take paths: decoders (PyAV, decord, PIL) and hashing. On Linux it is /proc/self/fd/N, which opens the
    descriptor's own file, so a symlink swapped in after the check cannot redirect them. With no roots
    to hold it to (an entry built outside a manifest reader), or no /proc, the path itself.

    Residual risk, stated: where /proc is missing the decoders reopen the path by name, so a swap in the
    window between the (device, inode) check and their open is not caught; and the probe (headers: size,
    fps, codec), scene splitting and auto-captioning still open media by name, so a swap timed for them
    can expose those readers (not the pixels that are decoded and cached) to a file outside the roots.
    """
    allowed = tuple(allowed)
    if not allowed:
        yield Path(path)
        return
    fd = _open_checked(path, allowed)
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        yield proc if os.path.exists(proc) else Path(path)
    finally:
        os.close(fd)


def media_digest(entry: Entry) -> str:
    """The content hash of an entry's primary media file, read from the descriptor checked under its roots."""
    from flowspeed.engines.common.io import file_digest

    with opened_under(entry.path, entry.roots) as path:
        return file_digest(path)


def caption_of(row: dict[str, Any], keys: Iterable[str] = CAPTION_KEYS) -> str | None:
    for key in keys:
        caps = row.get(key)
        if isinstance(caps, list):
            caps = next((c for c in caps if isinstance(c, str) and c.strip()), None)
        if isinstance(caps, str) and caps.strip():
            return caps.strip()
    return None


def _media_of(row: dict[str, Any]) -> str | None:
    return next((row[k] for k in MEDIA_KEYS if isinstance(row.get(k), str) and row[k]), None)


def _row_entry(row: Any, lineno: int, where: str, root: Path, roots: tuple[Path, ...]) -> Item:
    if not isinstance(row, dict):
        return Rejection(where, "manifest", f"record {lineno} is not an object", "bad_record")
    raw = _media_of(row)
    if raw is None and all(isinstance(row.get(k), str) and row[k] for k in PREFERENCE_KEYS):
        return _pair_entry(row, lineno, root, roots)
    if raw is None:
        return Rejection(
            where, "manifest", f'record {lineno} has no "file" (or {"/".join(MEDIA_KEYS[1:])}) string', "no_media"
        )
    resolved = resolve_under(raw, root, roots)
    if isinstance(resolved, str):
        return Rejection(raw, "manifest", f"record {lineno}: {resolved}", "escapes_root")
    meta = {k: v for k, v in row.items() if k not in MEDIA_KEYS and k not in CAPTION_KEYS}
    return Entry(lineno, resolved, caption_of(row), (resolved,), meta, (root, *roots))


def _pair_entry(row: dict[str, Any], lineno: int, root: Path, roots: tuple[Path, ...]) -> Item:
    """A generation family's preference row (`{"caption": ..., "chosen": "a.png", "rejected": "b.png"}`, no media
    column): both files held to the roots like any media; the chosen one is the primary path (what SFT trains on),
    media = (chosen, rejected), and meta keeps the pair as written (the latent prep caches both sides)."""
    paths = []
    for key in PREFERENCE_KEYS:
        resolved = resolve_under(row[key], root, roots)
        if isinstance(resolved, str):
            return Rejection(row[key], "manifest", f"record {lineno} ({key}): {resolved}", "escapes_root")
        paths.append(resolved)
    meta = {k: v for k, v in row.items() if k not in CAPTION_KEYS}
    return Entry(lineno, paths[0], caption_of(row), tuple(paths), meta, (root, *roots))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any | json.JSONDecodeError]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                try:
                    yield lineno, json.loads(raw)
                except json.JSONDecodeError as exc:
                    yield lineno, exc
                except RecursionError as exc:  # nested deeper than the parser's stack: one bad line, not a crash
                    yield lineno, json.JSONDecodeError(f"nested too deeply ({type(exc).__name__}: {exc})", raw, 0)


# A string (escapes included) or one structural character: what splitting a JSON array at its top level
# needs to see. Everything else (numbers, literals, white space) is skipped by the regex engine.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def _json_array_rows(path: Path, text: str | None = None) -> list[tuple[int, Any | json.JSONDecodeError]]:
    """The records of a whole-file JSON array (LLaVA conversation files, Open-Sora-Plan annotations),
    numbered from 1; a record that cannot be parsed is a `JSONDecodeError` in its place.

    `json.loads` of the whole file raises RecursionError for the file when one record nests deeper
    than the parser's stack: one hostile record would sink the whole prep. Then the array is split at
    its top level (strings skipped, brackets counted, no recursion) and each record parsed on its own,
    so only the deep one is lost. A file that is not a JSON array at all raises one ValueError naming it.
    """
    if text is None:
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"manifest {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}; fix the file, "
            "or write one record per line as JSONL"
        ) from exc
    except RecursionError:
        return _split_json_array(path, text)
    if not isinstance(data, list):
        raise ValueError(
            f"manifest {path} must hold a JSON list of records, not {type(data).__name__}; "
            "put the records in a top-level [...] array, or write one record per line as JSONL"
        )
    return list(enumerate(data, start=1))


def _split_json_array(path: Path, text: str) -> list[tuple[int, Any | json.JSONDecodeError]]:
    """`_json_array_rows` for an array with a record too deep to parse: each top-level element parsed alone."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        raise ValueError(
            f"manifest {path} nests deeper than the JSON parser can follow and is not a top-level [...] array of "
            "records, so no record can be told from another; remove the deeply nested values, or write one record "
            "per line as JSONL (a bad line is then rejected alone)"
        )
    spans: list[tuple[int, int]] = []
    depth, begin, end = 0, start + 1, None
    for m in _JSON_TOKEN.finditer(text, start):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                end = m.start()
                break
        elif tok == "," and depth == 1:
            spans.append((begin, m.start()))
            begin = m.end()
    if end is None or text[end + 1 :].strip():
        raise ValueError(f"manifest {path} is not valid JSON: its top-level [...] array is not closed; fix the file")
    if text[begin:end].strip() or spans:
        spans.append((begin, end))
    rows: list[tuple[int, Any | json.JSONDecodeError]] = []
    for n, (a, b) in enumerate(spans, start=1):
        raw = text[a:b]
        try:
            rows.append((n, json.loads(raw)))
        except json.JSONDecodeError as exc:
            rows.append((n, exc))
        except RecursionError as exc:
            rows.append((n, json.JSONDecodeError(f"nested too deeply ({type(exc).__name__}: {exc})", raw, 0)))
    return rows


def _first_record(path: Path) -> dict | None:
    try:
        if path.suffix == ".jsonl":
            for _, row in _jsonl_rows(path):
                return row if isinstance(row, dict) else None
        elif path.suffix == ".json" and path.stat().st_size < 512 * 2**20:
            rows = _json_array_rows(path)
            return rows[0][1] if rows and isinstance(rows[0][1], dict) else None
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError, not a list
        return None
    return None


def _table_rows(path: Path, root: Path, roots: tuple[Path, ...], rows: Iterable[tuple[int, Any]]) -> Iterator[Item]:
    for lineno, row in rows:
        if isinstance(row, json.JSONDecodeError):
            what = "record" if path.suffix == ".json" else "line"
            yield Rejection(f"{path}:{lineno}", "manifest", f"{what} {lineno} is not valid JSON: {row.msg}", "bad_json")
            continue
        yield _row_entry(row, lineno, f"{path}:{lineno}", root, roots)


# ---- readers ------------------------------------------------------------------------------------


def _is_cogvideox(path: Path, first: dict | None) -> bool:
    return path.suffix == ".jsonl" and bool(first) and "file" in first and "captions" in first


@register_format("cogvideox", _is_cogvideox)
def read_cogvideox(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    yield from _table_rows(path, path.resolve().parent, roots, _jsonl_rows(path))


@register_format("jsonl", lambda p, first: p.suffix == ".jsonl")
def read_jsonl_table(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    yield from _table_rows(path, path.resolve().parent, roots, _jsonl_rows(path))


@register_format("json", lambda p, first: p.suffix == ".json")
def read_json_table(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    yield from _table_rows(path, path.resolve().parent, roots, _json_array_rows(path))


@register_format("csv", lambda p, first: p.suffix in (".csv", ".tsv"))
def read_csv_table(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
        # Record numbers count data rows from 1, as the other readers do (the header is row 0).
        yield from _table_rows(path, path.resolve().parent, roots, enumerate(reader, start=1))


@register_format("parquet", lambda p, first: p.suffix == ".parquet")
def read_parquet_table(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    import pyarrow.parquet as pq

    def rows() -> Iterator[tuple[int, dict]]:
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):  # streaming, not the whole file
            for row in batch.to_pylist():
                n += 1
                yield n, row

    yield from _table_rows(path, path.resolve().parent, roots, rows())


@register_format("folder", lambda p, first: p.is_dir())
def read_folder(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    root = path.resolve()
    found = sorted(path.rglob("*"))  # rglob does not descend into symlinked folders: those are checked here
    for link in (p for p in found if p.is_symlink() and p.is_dir()):
        resolved = resolve_under(str(link.relative_to(path)), root, roots)
        if isinstance(resolved, str):
            yield Rejection(str(link.relative_to(path)), "manifest", f"linked folder: {resolved}", "escapes_root")
    files = [p for p in found if p.suffix.lower() in MEDIA_SUFFIXES]
    for n, media in enumerate(files, start=1):
        rel = str(media.relative_to(path))
        resolved = resolve_under(rel, root, roots)
        if isinstance(resolved, str):
            yield Rejection(rel, "manifest", resolved, "escapes_root")
            continue
        caption = _sidecar_caption(media.with_suffix(".txt"), path, root, roots)
        if isinstance(caption, Rejection):
            yield caption
            continue
        yield Entry(n, resolved, caption, (resolved,), {}, (root, *roots))


def _sidecar_caption(sidecar: Path, folder: Path, root: Path, roots: tuple[Path, ...]) -> str | None | Rejection:
    """A media file's `.txt` caption, held to the same roots as the media: a sidecar that links out of
    the dataset would otherwise copy any readable file into the training captions."""
    if not os.path.lexists(sidecar):
        return None
    rel = str(sidecar.relative_to(folder))
    resolved = resolve_under(rel, root, roots)
    if isinstance(resolved, str):
        return Rejection(rel, "manifest", f"sidecar caption: {resolved}", "escapes_root")
    if not resolved.is_file():
        return None
    try:
        return read_text_under(resolved, (root, *roots)).strip() or None
    except EscapedRoot as exc:
        return Rejection(rel, "manifest", f"sidecar caption: {exc}", "escapes_root")
    except OSError as exc:
        return Rejection(rel, "manifest", f"sidecar caption {resolved} unreadable: {exc}", "bad_caption")


def _is_opensora_plan(path: Path, first: dict | None) -> bool:
    if path.suffix != ".txt" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        line = fh.readline().strip()
    return line.count(",") >= 1 and line.rsplit(",", 1)[1].strip().endswith(".json")


@register_format("opensora_plan", _is_opensora_plan)
def read_opensora_plan(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    base = path.resolve().parent
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if "," not in line:
            yield Rejection(
                f"{path}:{lineno}", "manifest", f"line {lineno} is not `<root>,<annotation.json>`", "bad_record"
            )
            continue
        root_s, ann_s = (s.strip() for s in line.rsplit(",", 1))
        # The data root and the annotation file are paths the manifest names like any other: a
        # `data.txt` may not widen the allowed roots by naming a folder elsewhere.
        data_root, ann = resolve_under(root_s, base, roots), resolve_under(ann_s, base, roots)
        if isinstance(data_root, str) or isinstance(ann, str):
            what = f"root: {data_root}" if isinstance(data_root, str) else f"annotation file: {ann}"
            yield Rejection(f"{path}:{lineno}", "manifest", f"line {lineno} {what}", "escapes_root")
            continue
        try:
            records = _json_array_rows(ann, read_text_under(ann, (base, *roots)))
        except EscapedRoot as exc:
            yield Rejection(f"{path}:{lineno}", "manifest", f"line {lineno} annotation file: {exc}", "escapes_root")
            continue
        except (OSError, ValueError) as exc:
            yield Rejection(str(ann), "manifest", f"annotation file of line {lineno} unreadable: {exc}", "bad_record")
            continue
        for n, rec in records:
            if isinstance(rec, json.JSONDecodeError):
                why = f"record {n} of the annotation file of line {lineno} is not valid JSON: {rec.msg}"
                yield Rejection(f"{ann}:{n}", "manifest", why, "bad_json")
                continue
            item = _row_entry(rec, n, f"{ann}:{n}", data_root, (base, *roots))
            if isinstance(item, Entry):
                item.meta.setdefault("annotation", str(ann))
            yield item


#: the two sides of a preference record (an answer each for a VLM, a media file each for a generation family)
PREFERENCE_KEYS = ("chosen", "rejected")


def _is_sharegpt(path: Path, first: dict | None) -> bool:
    return bool(first) and ("messages" in first or "conversations" in first)


@register_format("sharegpt", _is_sharegpt)
def read_sharegpt(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    root = path.resolve().parent
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _json_array_rows(path)
    for n, row in rows:
        where = f"{path}:{n}"
        if isinstance(row, json.JSONDecodeError):
            what = "line" if path.suffix == ".jsonl" else "record"
            yield Rejection(where, "manifest", f"{what} {n} is not valid JSON: {row.msg}", "bad_json")
            continue
        turns = row.get("messages", row.get("conversations")) if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns:
            yield Rejection(where, "manifest", f"record {n} has no messages/conversations list", "bad_record")
            continue
        text = " ".join(str(t.get("content", t.get("value", ""))) for t in turns if isinstance(t, dict))
        media: list[Path] = []
        bad, code = None, "placeholder_mismatch"
        for kind in ("image", "video"):
            files = row.get(f"{kind}s", []) or []
            files = [files] if isinstance(files, str) else files
            if text.count(f"<{kind}>") != len(files):
                bad = f"record {n}: {text.count(f'<{kind}>')} <{kind}> placeholders but {len(files)} {kind}s"
                break
            for f in files:
                resolved = resolve_under(f, root, roots)
                if isinstance(resolved, str):
                    bad, code = f"record {n}: {f}: {resolved}", "escapes_root"
                    break
                media.append(resolved)
            if bad:
                break
        if bad:
            yield Rejection(where, "manifest", bad, code)
            continue
        first = media[0] if media else path.resolve()
        # a preference record (LLaMA-Factory's ShareGPT DPO layout) keeps its two answers for the preference prep
        pair = {k: row[k] for k in PREFERENCE_KEYS if k in row}
        yield Entry(n, first, None, tuple(media), {"messages": turns, **pair}, (root, *roots))


def _is_audio(path: Path, first: dict | None) -> bool:
    return bool(first) and ("audio" in first or "audio_filepath" in first)


@register_format("audio", _is_audio)
def read_audio(path: Path, roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _json_array_rows(path)
    yield from _table_rows(path, path.resolve().parent, roots, rows)


# ---- entry point --------------------------------------------------------------------------------

# Detection order: the specific conventions before the generic tables they are also valid as.
_DETECT_ORDER = ("folder", "opensora_plan", "sharegpt", "audio", "cogvideox", "jsonl", "json", "csv", "parquet")


def detect_format(manifest: Path) -> str:
    first = _first_record(manifest) if manifest.is_file() else None
    for name in _DETECT_ORDER:
        if _FORMATS[name].detect(manifest, first):
            return name
    raise ValueError(
        f"cannot tell the format of manifest {manifest}; set data.manifest_format to one of: "
        f"{', '.join(known_formats())}"
    )


def read_manifest(manifest: Path, fmt: str = "auto", roots: Iterable[Path] = ()) -> Iterator[Item]:
    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(
            f"manifest {manifest} does not exist; set data.manifest, or write a demo dataset with "
            "`flowspeed demo-data DIR`"
        )
    name = detect_format(manifest) if fmt == "auto" else fmt
    if name not in _FORMATS:
        raise ValueError(f"unknown manifest format {name!r}; known formats: {', '.join(known_formats())}")
    yield from _FORMATS[name].read(manifest, tuple(Path(r) for r in roots))


def read_sources(manifest: Path, fmt: str = "auto", roots: Iterable[Path] = (), incoming: Path | None = None):
    """The manifest's items, then those of `incoming`: a folder that scheduled runs pick new files up
    from (media + `.txt` captions beside them). Incoming items are numbered after the manifest's, so
    sample order stays stable as files arrive; the prep cache makes the files seen before free."""
    last = 0
    for item in read_manifest(manifest, fmt, roots):
        if isinstance(item, Entry):
            last = max(last, item.line)
        yield item
    if incoming is None:
        return
    if not Path(incoming).is_dir():
        raise FileNotFoundError(f"data.incoming={incoming} is not a folder; create it or unset data.incoming")
    for item in read_manifest(Path(incoming), "folder", roots):
        yield dataclasses.replace(item, line=last + item.line) if isinstance(item, Entry) else item
