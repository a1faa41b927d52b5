"""Small file helpers every stage shares: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def default_modes(root: Path) -> Path:
    """Give `root` (a file, or a folder and everything in it) the modes a plain `open`/`mkdir` would under the
    user's umask. mkstemp/mkdtemp (our atomic writes' temp names) and safetensors' own temp files create owner-only
    entries (0600/0700), so without this a teammate could not read a shared cache, checkpoint or export."""
    mask = _umask()
    root = Path(root)
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.stat().st_mode & 0o777 == 0o600:  # a temp file's mode; leave modes someone set on purpose
            os.chmod(path, 0o666 & ~mask)
    return root


def atomic_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` then rename onto `target`: readers see the old file or the whole new one, with the
    modes the user's umask gives a new file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        default_modes(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(target: Path, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text))


def write_jsonl(target: Path, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(target, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def file_digest(path: Path) -> str:
    """Content hash (BLAKE2b-128): a renamed file keeps its cache entries, an edited one does not."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def text_digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class RecordStore:
    """Key -> JSON row, one file per writer (a prep slice or rank), merged on read.

    Slices running at once on threads, processes or other hosts never write the same file, so no
    slice's rows are lost to another's rename; each file holds the rows its writer produced.
    """

    def __init__(self, root: Path, stem: str, key: str, writer: int = 0) -> None:
        self.root, self.stem, self.key = Path(root), stem, key
        self.own = self.root / f"{stem}-w{writer:03d}.jsonl"
        self.rows: dict[str, dict[str, Any]] = {}
        for path in sorted(self.root.glob(f"{stem}-w*.jsonl")):
            for row in read_jsonl(path):
                self.rows.setdefault(row[key], row)
        self._mine = {row[key] for row in read_jsonl(self.own)}
        self._dirty = False

    def __contains__(self, k: str) -> bool:
        return k in self.rows

    def get(self, k: str, default: Any = None) -> Any:
        return self.rows.get(k, default)

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row[self.key]] = row
        self._mine.add(row[self.key])
        self._dirty = True

    def save(self) -> None:
        if self._dirty:
            write_jsonl(self.own, [self.rows[k] for k in sorted(self._mine)])


@contextlib.contextmanager
def replaced_dir(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside `out_dir` (`.<name>.*.tmp`) that replaces it whole when the block finishes, and
    is removed if the block raises. The old folder is moved aside before the rename, not deleted first, so
    a kill at any point leaves the old folder or the new one under the name, never neither."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        default_modes(tmp)  # mkdtemp's 0700 would keep a shared export from teammates
        old = None
        if out_dir.exists():  # rename() replaces only an empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
