"""Load a pipeline config from YAML with `KEY=VALUE` overrides, and save it next to outputs.

Precedence: command-line overrides beat the file, which beats the schema defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from flowspeed.configs.schema import PipelineConfig
from flowspeed.configs.validate import ConfigError, config_problems, explain
from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "apply_overrides", "dump_config", "flatten", "load_config", "parse_override", "save_config"]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field path `loc` (without its last element)."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = ", ".join(sorted(owner.model_fields)) if owner else "?"
            section = ".".join(str(p) for p in loc[:-1]) or "top level"
            lines.append(f"unknown key `{dotted}` ({section}); valid keys: {valid}")
        else:
            lines.append(f"`{dotted}`: {e['msg']} (got {e.get('input')!r})")
    return explain(lines, source)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like section.key=value, e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    # YAML typing gives `20` -> int, `1e-4` -> float, `[a, b]` -> list, `null` -> None.
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; users mean a float.
            value = float(raw)
        except ValueError:
            pass
    return [p for p in key.strip().split(".") if p], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override `{item}`: `{part}` is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; `include: [files]` (relative to it) are merged underneath it, in order."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (a YAML file or a recipe: `flowspeed recipes list`)")
    if path.resolve() in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    includes = data.pop("include", []) or []
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    workdir: str | Path | None = None,
    *,
    check: bool = True,
) -> PipelineConfig:
    """The pipeline config of `path` with `overrides`, checked before any work starts.

    Beyond the schema (types, ranges, unknown keys), `check` refuses every mistake the config alone
    reveals (configs/validate.py: layout vs world size, engine vs family, registry names, frame
    rules), so `flowspeed run` fails in a second instead of after prep. `check=False` returns such a
    config anyway: for showing it, or for testing the launchers' own refusal. What depends on the
    machine (paths that must exist) is `flowspeed.configs.validate.check_stage`, run when a stage starts.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        from flowspeed.configs.recipes import resolve_config  # a shipped recipe's name works where no file is

        path = resolve_config(path)
        data = _read_yaml(path)
        source = str(path)
        if isinstance(data.get("tracking", {}), dict):  # tagged flowspeed.recipe: runs of one workdir told apart
            data.setdefault("tracking", {}).setdefault("recipe", Path(path).stem)
    data = apply_overrides(data, list(overrides or []))
    if workdir is not None:
        data["workdir"] = str(workdir)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None
    if check and (problems := config_problems(cfg)):
        raise ConfigError(explain(problems, source))
    return cfg


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: PipelineConfig, out_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output, atomically, so every artefact says what made it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, target)
    return target


def flatten(cfg: PipelineConfig) -> dict[str, str]:
    """Dotted params for MLflow (`train.lr` -> "0.001")."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(node)[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out
