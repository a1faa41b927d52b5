"""`flowspeed config show|validate`: see and check a config before anything runs.

    flowspeed config show configs/quickstart.yaml --set train.max_steps=5     # the resolved YAML
    flowspeed config validate configs/pipelines/llava-sft-megatron.yaml       # "ok", or what to fix

Both load the config exactly as `flowspeed run` does (includes, `--set` overrides, `--workdir`), so what
`show` prints is what a run would use and `validate` refuses what a run would refuse, in about a
second and without writing a file. Mounted on the main app as `app.add_typer(config_app, name="config")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flowspeed.configs.validate import STAGES

config_app = typer.Typer(no_args_is_help=True, help="Show the resolved config, or check it without running anything.")

ConfigArg = Annotated[Path, typer.Argument(help="pipeline YAML, e.g. configs/quickstart.yaml")]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", help="the workdir a run would use")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.max_steps=20")]


def _refuse(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@config_app.command("show")
def show(config: ConfigArg, set_: SetOpt = None, workdir: WorkdirOpt = None) -> None:
    """Print the resolved config (file + includes + --set + defaults) as YAML; exit 1 if a run would refuse it."""
    from flowspeed.configs.loader import ConfigError, dump_config, load_config
    from flowspeed.configs.validate import config_problems, explain

    try:  # unchecked first: a config with a mistake is still worth seeing whole
        cfg = load_config(config, set_ or [], workdir, check=False)
    except ConfigError as exc:
        _refuse(str(exc))
    typer.echo(dump_config(cfg), nl=False)
    if problems := config_problems(cfg):
        _refuse(f"a run would refuse it: {explain(problems, str(config))}")


@config_app.command("validate")
def validate(
    config: ConfigArg,
    set_: SetOpt = None,
    workdir: WorkdirOpt = None,
    stage: Annotated[
        str, typer.Option("--stage", help=f"also check the paths this stage reads ({', '.join(STAGES)})")
    ] = "run",
    paths: Annotated[
        bool, typer.Option("--paths/--no-paths", help="check that the files and folders it names exist here")
    ] = True,
) -> None:
    """Check a config as `flowspeed <stage>` would before starting: print "ok", or each mistake and its fix (exit 1)."""
    from flowspeed.configs.loader import ConfigError, load_config
    from flowspeed.configs.validate import check_stage

    if stage not in STAGES:
        _refuse(f"--stage {stage!r}: use one of {', '.join(STAGES)}")
    try:
        cfg = load_config(config, set_ or [], workdir)
        if paths:
            check_stage(cfg, stage, str(config))
    except ConfigError as exc:
        _refuse(str(exc))
    typer.echo("ok")
