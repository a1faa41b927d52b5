"""Read a CogVideoX-style JSONL manifest (`{"file": ..., "captions": ...}` per line), streaming.

A manifest of millions of lines must survive one bad line: malformed lines become recorded
rejections with their line number, and the rest is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    line: int
    path: Path
    caption: str


@dataclass(frozen=True)
class Rejection:
    path: str
    stage: str
    reason: str

    def as_row(self) -> dict[str, str]:
        return {"path": self.path, "stage": self.stage, "reason": self.reason}


def _caption(row: dict) -> str | None:
    caps = row.get("captions", row.get("caption", row.get("text")))
    if isinstance(caps, list):
        caps = next((c for c in caps if isinstance(c, str) and c.strip()), None)
    return caps.strip() if isinstance(caps, str) and caps.strip() else None


def read_manifest(manifest: Path) -> Iterator[Entry | Rejection]:
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(
            f"manifest {manifest} does not exist; set data.manifest, or write a demo dataset with "
            "`flowspeed demo-data DIR`"
        )
    root = manifest.resolve().parent
    with open(manifest, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield Rejection(where, "manifest", f"line {lineno} is not valid JSON: {exc.msg}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not row["file"]:
                yield Rejection(where, "manifest", f'line {lineno} has no "file" string')
                continue
            caption = _caption(row)
            if caption is None:
                yield Rejection(row["file"], "manifest", f"line {lineno} has no non-empty caption")
                continue
            path = (root / row["file"]).resolve()
            # Relative paths resolve under the manifest's folder; escaping it is refused unread.
            if not path.is_relative_to(root):
                yield Rejection(row["file"], "manifest", f"line {lineno}: path escapes the manifest folder {root}")
                continue
            yield Entry(lineno, path, caption)
