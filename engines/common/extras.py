"""Optional stacks: which extra of `pip install 'flowspeed[...]'` brings which import, and one refusal for all.

A base `pip install flowspeed` runs the quickstart; the heavy or platform-bound stacks are extras
(pyproject.toml `[project.optional-dependencies]`). Code that needs one calls `require(...)` where the
stack is first needed (or `missing(...)` from a config check, which imports nothing), so a user without
it gets one sentence naming the feature and the exact install line, not a bare ModuleNotFoundError
from deep inside a rank:

    decord = require("decord", "data.decoder: decord")
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_line", "missing", "require"]

#: import name -> (extra that installs it, distribution name)
EXTRAS: dict[str, tuple[str, str]] = {
    "megatron.core": ("megatron", "megatron-core"),
    "scenedetect": ("curate", "scenedetect"),
    "cv2": ("curate", "opencv-python-headless"),
    "jiwer": ("speech", "jiwer"),
    "decord": ("video-decode", "decord"),
    "prefect_dask": ("dask", "prefect-dask"),
    "prefect_ray": ("ray", "prefect-ray"),
    "pynvml": ("gpu", "nvidia-ml-py"),
    "torch_npu": ("npu", "torch_npu"),
    "psycopg2": ("team", "psycopg2-binary"),
}


class MissingExtraError(ImportError):
    """An optional stack is not installed; the message holds the `pip install 'flowspeed[...]'` line."""


def install_line(module: str) -> str:
    return f"pip install 'flowspeed[{EXTRAS[module][0]}]'"


def missing(module: str, feature: str, instead: str = "") -> str | None:
    """None when `module` can be imported here, else the refusal for `feature` (plus `instead`, a way to do
    without it); finds the module without importing it (cheap enough for a config check)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a None in sys.modules
        found = False
    return None if found else _message(module, feature, instead)


def _message(module: str, feature: str, instead: str = "") -> str:
    alternative = f", or {instead}" if instead else ""
    return f"{feature} needs {EXTRAS[module][1]}, which is not installed here: {install_line(module)}{alternative}"


def require(module: str, feature: str, instead: str = "") -> ModuleType:
    """`import module`, or MissingExtraError naming `feature` and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # only the module itself (or a parent) missing means "not installed"; a broken install keeps its own error
        name = getattr(exc, "name", None)
        if name is not None and not (module == name or module.startswith(name + ".")):
            raise
        raise MissingExtraError(_message(module, feature, instead)) from exc
