"""The recipes flowspeed ships, read from the installed package (`flowspeed.configs` package data).

A recipe is a YAML config that runs as it is: the quickstarts (`configs/*.yaml`), one pipeline per
family and task (`configs/pipelines/`), the finetunes of released weights (`pipelines/published/`) and
the eval presets (`configs/eval/`). They are read through `importlib.resources`, so
`flowspeed run quickstart` and `flowspeed recipes init sd3-t2i mydir` work from a `pip install`ed wheel
in any directory, not only from a checkout. Names:

    quickstart, sd3-quickstart, ...     configs/<name>.yaml
    sd3-t2i, qwen2_vl-sft-lora, ...     configs/pipelines/<name>.yaml
    published/opensora-v1.2, ...        configs/pipelines/published/<name>.yaml
    eval/sd3, eval/qwen2_vl, ...        configs/eval/<name>.yaml

Recipes refer to each other only by `include:` (paths relative to the including file, configs/loader.py);
`init` copies a recipe with everything it includes, keeping those relative paths, so the copy runs alone.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml
from flowspeed.configs.validate import ConfigError

__all__ = ["KINDS", "Recipe", "find_recipe", "init_recipe", "recipe_files", "recipe_path", "recipes", "resolve_config"]

#: (folder under configs/, name prefix, kind shown by `flowspeed recipes list`)
_FOLDERS: tuple[tuple[str, str, str], ...] = (
    ("", "", "quickstart"),
    ("pipelines", "", "pipeline"),
    ("pipelines/published", "published/", "published"),
    ("eval", "eval/", "eval"),
)

KINDS: tuple[str, ...] = tuple(kind for _, _, kind in _FOLDERS)


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str
    relpath: str  # posix path under flowspeed/configs/
    summary: str  # the file's first comment line


def _root() -> Traversable:
    return files("flowspeed.configs")


def _at(relpath: str) -> Traversable:
    node = _root()
    for part in relpath.split("/"):
        node = node / part
    return node


def _summary(text: str) -> str:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def recipes() -> dict[str, Recipe]:
    """Every shipped recipe by name, in listing order."""
    out: dict[str, Recipe] = {}
    for folder, prefix, kind in _FOLDERS:
        node = _at(folder) if folder else _root()
        for entry in sorted(node.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(".yaml"):
                stem = entry.name[: -len(".yaml")]
                relpath = f"{folder}/{entry.name}" if folder else entry.name
                out[prefix + stem] = Recipe(prefix + stem, kind, relpath, _summary(entry.read_text()))
    return out


def find_recipe(name: str, what: str = "no recipe named {name!r}") -> Recipe:
    """The recipe called `name` (a trailing `.yaml` is allowed); an unknown name lists the closest ones."""
    known = recipes()
    key = name.removesuffix(".yaml")
    if key in known:
        return known[key]
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"{what.format(name=name)}.{hint} `flowspeed recipes list` shows them all.")


def recipe_files(name: str) -> list[str]:
    """The recipe's file and every file it includes (transitively), as posix paths under configs/, recipe first."""
    order: list[str] = []
    todo = [find_recipe(name).relpath]
    while todo:
        rel = todo.pop(0)
        if rel in order:
            continue
        order.append(rel)
        data = yaml.safe_load(_at(rel).read_text()) or {}
        includes = data.get("include", []) if isinstance(data, dict) else []
        for inc in [includes] if isinstance(includes, str) else includes or []:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), inc))
            assert not target.startswith(".."), f"{rel} includes {inc}, outside the shipped configs"
            todo.append(target)
    return order


def recipe_path(name: str) -> Path:
    """The installed file of recipe `name`, for loading it in place (its includes sit beside it).

    Installed packages are plain folders (pip unpacks wheels), so package data has a filesystem path; a
    zip-imported flowspeed has none, and `flowspeed recipes init` is then the way to a runnable copy."""
    node = _at(find_recipe(name).relpath)
    if not isinstance(node, Path):
        raise ConfigError(f"recipe {name!r} is inside an archive; copy it out with `flowspeed recipes init {name} DIR`")
    return node


def resolve_config(path: str | Path) -> Path:
    """`path` itself when it is a file (a file always wins), else the shipped recipe of that name
    (`flowspeed run quickstart`). A missing `*.yaml` or longer path is returned unchanged, for the loader
    to report as a missing file; a missing bare name is refused here with the closest recipe names."""
    path = Path(path)
    if path.is_file() or len(path.parts) > 2:  # a recipe name is `name` or `kind/name`
        return path
    key = path.as_posix().removesuffix(".yaml")
    if key in recipes() or not path.name.endswith(".yaml"):
        return recipe_path(find_recipe(key, "{name!r} is neither a config file here nor a recipe").name)
    return path


def init_recipe(name: str, dest: Path, *, force: bool = False) -> Path:
    """Copy recipe `name` and the files it includes into `dest`, keeping their paths relative to each other;
    returns the recipe's copy. An existing file with other content is refused unless `force`: it is the
    user's edit. Each file is written atomically (temp file, then rename)."""
    rels = recipe_files(name)
    clashes = [r for r in rels if (dest / r).exists() and (dest / r).read_text() != _at(r).read_text()]
    if clashes and not force:
        listed = ", ".join(str(dest / r) for r in clashes)
        raise ConfigError(f"{listed} already exist(s) with other content; use --force to overwrite, or another DIR")
    for rel in rels:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(_at(rel).read_text())
        os.replace(tmp, target)
    return dest / rels[0]
