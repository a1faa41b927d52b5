"""`flowspeed recipes list|show|init`: the recipes and eval presets shipped inside the installed package.

    flowspeed recipes list                          # name, kind, what it is
    flowspeed recipes show sd3-t2i                  # the YAML as shipped (`--resolved`: with includes and defaults)
    flowspeed recipes init sd3-t2i mydir            # a runnable copy to edit: mydir/pipelines/sd3-t2i.yaml + includes
    flowspeed run quickstart                        # any command that takes a config also takes a recipe name

The recipes are package data (flowspeed/configs/), so these work after `pip install flowspeed` in any
directory. Mounted on the main app as `app.add_typer(recipes_app, name="recipes")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

recipes_app = typer.Typer(no_args_is_help=True, help="The shipped recipes and eval presets: list, show, copy out.")

NameArg = Annotated[str, typer.Argument(help="recipe name, e.g. quickstart, sd3-t2i, eval/sd3 (see `recipes list`)")]


def _refuse(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@recipes_app.command("list")
def list_(kind: Annotated[str | None, typer.Option("--kind", help="only this kind, e.g. eval")] = None) -> None:
    """Every shipped recipe: name, kind (quickstart, pipeline, published, eval) and its first comment line."""
    from flowspeed.configs.recipes import KINDS, recipes

    if kind is not None and kind not in KINDS:
        _refuse(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    shown = [r for r in recipes().values() if kind is None or r.kind == kind]
    width = max((len(r.name) for r in shown), default=4)
    # plain aligned lines, one per recipe: readable, and `| grep` / `| cut` friendly
    for r in shown:
        typer.echo(f"{r.name:<{width}}  {r.kind:<10}  {r.summary}".rstrip())


@recipes_app.command("show")
def show(
    name: NameArg,
    resolved: Annotated[bool, typer.Option("--resolved", help="the full config a run would use")] = False,
) -> None:
    """Print a recipe's YAML as shipped, or with `--resolved` the whole config after includes and defaults."""
    from flowspeed.configs.loader import ConfigError, dump_config, load_config
    from flowspeed.configs.recipes import recipe_path

    try:
        if resolved:
            typer.echo(dump_config(load_config(recipe_path(name), check=False)), nl=False)
        else:
            typer.echo(recipe_path(name).read_text(), nl=False)
    except ConfigError as exc:
        _refuse(str(exc))


@recipes_app.command("init")
def init(
    name: NameArg,
    dest: Annotated[Path, typer.Argument(help="folder to copy it into (created if missing)")],
    force: Annotated[bool, typer.Option("--force", help="overwrite files edited since a previous init")] = False,
) -> None:
    """Copy a recipe and every file it includes into DEST, keeping their relative paths, so it runs from there."""
    from flowspeed.configs.loader import ConfigError
    from flowspeed.configs.recipes import find_recipe, init_recipe, recipe_files

    try:
        main = init_recipe(name, dest, force=force)
    except ConfigError as exc:
        _refuse(str(exc))
    for rel in recipe_files(name):
        typer.echo(f"wrote {dest / rel}")
    rel_main = main.relative_to(dest)
    # recipe paths (the demo manifest, workdirs) are relative to where flowspeed runs: DEST
    command = f"eval {rel_main} --set eval.model=MODEL" if find_recipe(name).kind == "eval" else f"run {rel_main}"
    typer.echo(f"run it:  cd {dest} && flowspeed demo-data runs/demo && flowspeed {command}")
