"""Loading the authors' released checkpoints into our module definitions.

Released video-DiT weights come as a bare `.pth` state dict (OpenSora 1.0), a training checkpoint with the weights
under "model"/"state_dict"/"ema" (OpenSoraPlan, MindSpeed-MM), a safetensors file, or a folder holding one or a
sharded safetensors index. `read_state_dict` reads all of them without ever unpickling code (`weights_only=True`),
and `load_published` renames the authors' keys into ours and refuses what would load silently wrong: a tensor whose
shape differs is an error naming every such key, and missing or unexpected keys are an error unless the caller
allows them (and then they are reported in the returned `LoadReport` and the log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

# Keys under which training scripts nest the weights, in the order they are preferred: an EMA copy is what the
# authors release for sampling, so it wins over the raw training weights when a checkpoint holds both. "gen_model"
# is OpenSoraPlan's VAE trainer (the generator, next to its discriminator).
_NESTED = ("ema", "ema_state_dict", "gen_model", "model", "state_dict", "module", "model_state_dict")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self, limit: int = 10) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {head(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {head(self.unexpected)}")
        return "; ".join(parts) or "all keys matched"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a released checkpoint file or folder, unnested from a training checkpoint's wrapper dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; point `pretrained` at the released file")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: not a checkpoint file (expected one of {', '.join(_WEIGHT_SUFFIXES)})")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _unnest(obj, path)


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(load_file(str(folder / shard)))
            return out
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ValueError(
            f"{folder}: expected exactly one weights file or a safetensors index, found {found}; "
            "point `pretrained` at the file itself"
        )
    return read_state_dict(files[0])


def _unnest(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)
    for key in _NESTED:
        # a trainer that ran without EMA still writes `"ema_state_dict": {}`; the weights are under the next key
        if isinstance(obj.get(key), Mapping) and obj[key]:
            return _unnest(obj[key], path)
    raise ValueError(f"{path}: no tensors found at the top level or under any of {', '.join(_NESTED)}")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")):
    """DDP's `module.` and torch.compile's `_orig_mod.` wrappers leak into saved keys; they are never part of a name."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
        out[key] = value
    return out


def load_published(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    from_published: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
) -> LoadReport:
    """Load the authors' weights (a path or a state dict in their layout) into `model`, in place.

    Shape mismatches always fail, naming each key with both shapes: they mean the variant's config is not the one
    the checkpoint was trained with. Missing/unexpected keys fail too unless allowed (a finetune that adds
    conditioning channels, say); the report lists them either way.
    """
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    ours = from_published(strip_prefix(raw))
    expected = model.state_dict()
    report = LoadReport(
        missing=sorted(k for k in expected if k not in ours),
        unexpected=sorted(k for k in ours if k not in expected),
    )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in ours.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    name = type(model).__name__
    if mismatched:
        raise ValueError(
            f"{name}: {len(mismatched)} tensors have the wrong shape for this config (is it the right variant?): "
            + "; ".join(mismatched[:10])
        )
    if (report.missing and not allow_missing) or (report.unexpected and not allow_unexpected):
        raise ValueError(f"{name}: the checkpoint does not match the model: {report.summary()}")
    model.load_state_dict({k: v for k, v in ours.items() if k in expected}, strict=False, assign=False)
    log.info("%s: loaded %d tensors (%s)", name, len(expected) - len(report.missing), report.summary())
    return report
