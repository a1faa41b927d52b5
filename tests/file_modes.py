"""What a file or folder's mode should be under the current umask (tests of shared outputs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def expected_modes() -> tuple[int, int]:
    """(folder, file) modes a plain mkdir/open gives under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask, 0o666 & ~mask


def assert_tree_modes(root: Path) -> None:
    folder, file = expected_modes()
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            assert mode(path) == folder, path
        else:
            assert mode(path) & file == file, path  # at least what the umask grants (executables may add x)
