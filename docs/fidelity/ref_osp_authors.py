"""Import the Open-Sora-Plan authors' modules from a tag's tree, for the reference scripts (not part of the suite).

Trees: `git --git-dir=<mirror of PKU-YuanGroup/Open-Sora-Plan> archive <tag> | tar -x -C /tmp/osp/<tag>` for
v1.2.0 (adb2a20a), v1.3.0 (11246218) and v1.3.1 (c41050ae; v1.3.0's tree lacks `causalvideovae/model/vae/`, the
WF-VAE module, so WF-VAE comes from v1.3.1, whose opensora/models differs from v1.3.0 only by adding that folder).

Run with the project venv and einops installed outside it:
    .venv/bin/pip install --no-deps --target /tmp/osp/pkgs einops
    PYTHONPATH=/tmp/osp/pkgs:. .venv/bin/python docs/fidelity/ref_osp.py ...

Stubbed (not needed by the module code that runs here): the package `__init__`s of `opensora`, `opensora.models`,
`opensora.models.diffusion`, `opensora.models.causalvideovae` and `opensora.utils` (they import the whole project);
`opensora.utils.utils` (only `to_2tuple` is used, re-defined here; the real file imports tensorboard);
`diffusers.models.transformer_2d` (moved in later diffusers: `Transformer2DModelOutput` is re-exported from
`diffusers.models.modeling_outputs`); for the v1.2.0 CausalVAE's training/eval imports, `pytorch_lightning`, `decord`,
`pytorchvideo`, `opensora.models.causalvideovae.utils.utils` and `opensora.models.causalvideovae.eval.*` (video IO and
metrics, never called by encode/decode), and `torchvision.io.read_video` /
`torchvision.transforms._transforms_video` where the installed torchvision no longer has them.
"""

from __future__ import annotations

import collections.abc
import importlib
import sys
import types
from pathlib import Path
from typing import Any


class _Anything(types.ModuleType):
    """A stub module: any attribute is a dummy class (imports succeed; nothing here is ever called)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _stub(name: str, module: types.ModuleType | None = None) -> None:
    sys.modules[name] = module or _Anything(name)


def authors(tree: str | Path, module: str) -> types.ModuleType:
    """Import `module` (e.g. "opensora.models.diffusion.opensora_v1_3.modeling_opensora") from the tag's tree."""
    root = Path(tree).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for pkg in ("opensora", "opensora.models", "opensora.models.diffusion", "opensora.models.causalvideovae",
                "opensora.utils", "opensora.models.causalvideovae.eval"):  # fmt: skip
        stub = types.ModuleType(pkg)
        stub.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules.setdefault(pkg, stub)
    utils = types.ModuleType("opensora.utils.utils")
    utils.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)
    sys.modules.setdefault("opensora.utils.utils", utils)
    from diffusers.models import modeling_outputs

    t2d = types.ModuleType("diffusers.models.transformer_2d")
    t2d.Transformer2DModelOutput = modeling_outputs.Transformer2DModelOutput
    sys.modules.setdefault("diffusers.models.transformer_2d", t2d)
    video_io = (
        "pytorch_lightning",
        "decord",
        "pytorchvideo",
        "pytorchvideo.transforms",
        "opensora.models.causalvideovae.utils.utils",
        "opensora.models.causalvideovae.eval.cal_psnr",
    )
    for name in video_io:
        if name not in sys.modules:
            _stub(name)
    import torchvision.io

    if not hasattr(torchvision.io, "read_video"):  # removed from recent torchvision; only imported there
        torchvision.io.read_video = None
    try:
        import torchvision.transforms._transforms_video  # noqa: F401
    except ImportError:
        _stub("torchvision.transforms._transforms_video")
    return importlib.import_module(module)
