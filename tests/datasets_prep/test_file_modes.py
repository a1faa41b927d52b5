"""Outputs get the user's umask (issue 18): atomic writes go through mkstemp/mkdtemp, which make owner-only
entries (0600/0700), so a shared cache, checkpoint or export was unreadable to teammates."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flowspeed.engines.common.io import atomic_write_text, default_modes

from tests.file_modes import mode as _mode


@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_atomic_writes_take_the_umask(tmp_path: Path, umask_027: int) -> None:
    target = atomic_write_text(tmp_path / "index.json", "{}")
    assert _mode(target) == 0o640  # mkstemp alone gives 0600


def test_default_modes_opens_a_temp_tree_but_keeps_deliberate_modes(tmp_path: Path, umask_027: int) -> None:
    import tempfile

    root = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as a checkpoint or export starts
    (root / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=root / "sub")  # 0600
    os.close(fd)
    script = root / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o750)
    default_modes(root)
    assert (_mode(root), _mode(root / "sub"), _mode(Path(name)), _mode(script)) == (0o750, 0o750, 0o640, 0o750)
