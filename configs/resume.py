"""Whether a checkpoint can be resumed by a config: the settings its tensors depend on must match.

Every checkpoint keeps the resolved config that wrote it (`step-N/config.yaml`). A resume under another
model (family, preset, weights, text length), engine, LoRA or EMA setting would either fail inside
torch.distributed.checkpoint (one CheckpointException per rank, a page of tracebacks) or load into the
wrong model. The layout (ranks, FSDP/TP/CP degrees) is not compared: checkpoints reshard on load, and
neither are the settings a resume is meant to change (steps, learning rate, precision).

No torch here: `flowspeed.configs.validate.stage_problems` runs this before a stage writes anything, and
`flowspeed.engines.loop.resume_path` again on the checkpoint it picks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from flowspeed.configs.schema import PipelineConfig

# The config sections a checkpoint's state (tensor names, shapes, which states exist) depends on.
STATE_KEYS = ("model", "train.engine", "train.lora", "train.ema.enabled")
_STEP = re.compile(r"^step-\d{8}$")
_ABSENT = object()


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _differences(key: str, saved: Any, now: Any) -> list[str]:
    """`key: <saved> in the checkpoint, <now> in this config` for each differing leaf. A key one side
    lacks (a checkpoint written before the setting existed) is not a difference: nothing to compare."""
    if saved is _ABSENT or now is _ABSENT:
        return []
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now)) for d in _differences(f"{key}.{k}", saved.get(k, _ABSENT),
                                                                               now.get(k, _ABSENT))]  # fmt: skip
    return [] if saved == now else [f"{key} is {saved!r} in the checkpoint but {now!r} in this config"]


def resume_conflicts(ckpt: Path, cfg: PipelineConfig) -> list[str]:
    """What differs between the config that wrote `ckpt` and `cfg`, in the settings the state depends on;
    empty when they agree or the checkpoint kept no config (written before checkpoints carried one)."""
    try:
        saved = yaml.safe_load((Path(ckpt) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict):
        return []
    now = cfg.model_dump(mode="json")
    return [d for key in STATE_KEYS for d in _differences(key, _at(saved, key), _at(now, key))]


def mismatch_message(ckpt: Path, conflicts: list[str]) -> str:
    return (
        f"cannot resume from checkpoint {ckpt}: it was written for another model or layout ({'; '.join(conflicts)}). "
        "Resume it with the config that wrote it (its config.yaml), or give this run a training folder of its own: "
        "leave train.output_dir unset (each model gets <workdir>/train/<family>-<digest>) or point it elsewhere"
    )


def newest_checkpoint(train_dir: Path) -> Path | None:
    """The newest published checkpoint folder under `train_dir` (by name; no file is read)."""
    root = Path(train_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if _STEP.match(p.name)) if root.is_dir() else []
    return found[-1] if found else None


def resume_problems(cfg: PipelineConfig) -> list[str]:
    """The train stage's resume, checked before anything runs: the named checkpoint, or (`auto`) the newest
    one in the training folder, must have been written for this model."""
    mode = cfg.train.resume
    if mode == "never":
        return []
    ckpt = newest_checkpoint(cfg.train_dir) if mode == "auto" else Path(mode)
    if ckpt is None or not ckpt.is_dir():
        return []
    conflicts = resume_conflicts(ckpt, cfg)
    return [mismatch_message(ckpt, conflicts)] if conflicts else []
