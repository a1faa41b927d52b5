"""Which exported model an eval reads: path logic only, importable without torch or a model library, so the
pipeline's cache check of a finished eval (every no-op rerun makes one) asks the same function the eval uses."""

from __future__ import annotations

import json
from pathlib import Path

from flowspeed.configs import PipelineConfig


def trained_export(cfg: PipelineConfig) -> Path:
    """The export an eval of this config reads. `<train_dir>/final`, except after `train.init_from:
    champion`, whose runs train in `<train_dir>/from-<model>-v<N>-<data>/` (one per champion and
    data): then the newest of those, so `flowspeed eval` alone finds what the last finetune made."""
    if cfg.eval.model:
        return model_to_evaluate(cfg, cfg.eval.model)
    final = cfg.train_dir / "final"
    if cfg.train.init_from != "champion":
        return final
    from flowspeed.engines.models import get_family  # the registry imports torch: only past the plain case

    family = get_family(cfg.model.family)
    done = [d / "final" for d in cfg.train_dir.glob("from-*") if family.export_files(d / "final")[0].is_file()]
    return max(done, key=lambda p: family.export_files(p)[0].stat().st_mtime) if done else final


def model_to_evaluate(cfg: PipelineConfig, model: str) -> Path:
    """`eval.model` as a local export folder: a registry version (downloaded once under the
    workdir), a training checkpoint (exported once beside the eval outputs), or an export."""
    from flowspeed.engines.tracking.serving import SETTINGS, weights_dir

    if model.startswith("models:/"):
        from flowspeed.engines.tracking.registry import fetch_version, resolve_version
        from flowspeed.engines.tracking.tracker import tracking_uri

        uri = tracking_uri(cfg)
        name, version = resolve_version(uri, model)
        local = fetch_version(uri, name, version, cfg.workdir / ".registry" / name)
        settings = local / SETTINGS
        family = json.loads(settings.read_text()).get("family") if settings.is_file() else None
        if family and family != cfg.model.family:
            raise ValueError(f"{model} is a {family} model but this config's model.family is {cfg.model.family}: "
                             f"evaluate it with a {family} config")  # fmt: skip
        return weights_dir(local)
    path = Path(model)
    if (path / "trainer_state.pt").is_file():
        from flowspeed.engines.models import get_family
        from flowspeed.engines.torch_engine.trainer import export_checkpoint

        out = cfg.eval_dir.parent / ".eval-exports" / f"{path.parent.parent.name}-{path.name}"
        if not get_family(cfg.model.family).export_files(out)[0].is_file():
            export_checkpoint(path, out)
        return out
    if not path.is_dir():
        raise FileNotFoundError(f"eval.model={model}: no such folder (a models:/ URI, a checkpoint or an export)")
    return weights_dir(path)
