"""Any shipped recipe as one Prefect deployment: the run form is a dropdown of recipe names and a list of
`--set` style overrides, instead of the ~170 fields of one config (the full typed config stays available:
the `flowspeed-pipeline` and stage deployments take a `cfg`).

    prefect deployment run 'recipe/flowspeed-recipe' --param recipe=sd3-quickstart \\
        --param overrides='["train.max_steps=10", "data.manifest=runs/demo/data.jsonl"]'

The flow loads the config as `flowspeed run RECIPE --set ...` does, runs the `pipeline` flow on it (a
subflow: the same stages, caching and MLflow runs as the CLI's; its flow run holds the summary table and the
MLflow link, flows/summary.py). Progress (prep counts, every `train.log_every` steps: step, loss,
samples/s, ETA) is in the flow run's logs through the `flowspeed` logger (engines/common/progress.py).
"""

from pathlib import Path
from typing import Any, Literal

from flowspeed.configs import PipelineConfig, check_stage, load_config
from flowspeed.configs.recipes import recipe_path, recipes
from flowspeed.flows.pipeline import pipeline
from flowspeed.tasks.tracking import prefect_run_url
from prefect import flow, get_run_logger

#: What the dropdown offers: the recipes `flowspeed run` runs end to end (the eval presets, `eval/...`,
#: evaluate a given model: `flowspeed eval`).
RUNNABLE_KINDS = ("quickstart", "pipeline", "published")
RECIPE_NAMES: tuple[str, ...] = tuple(name for name, r in recipes().items() if r.kind in RUNNABLE_KINDS)
# A Literal of the names, so the parameter's JSON schema is an enum: Prefect's run form renders a dropdown.
RecipeName = Literal[RECIPE_NAMES]  # type: ignore[valid-type]  # built from the package's recipe files


def recipe_config(
    recipe: str, overrides: list[str] | tuple[str, ...] = (), workdir: str | None = None
) -> PipelineConfig:
    """The config `flowspeed run RECIPE --set KEY=VALUE ... [--workdir W]` runs, with the same checks before
    any work starts (a wrong key, value or missing path fails the flow run in a second, with the reason)."""
    cfg = load_config(recipe_path(recipe), list(overrides), workdir)
    check_stage(cfg, "run", recipe)
    return cfg


@flow(name="recipe", log_prints=True)
def run_recipe(
    recipe: RecipeName = "quickstart",  # type: ignore[valid-type]
    overrides: tuple[str, ...] = (),
    workdir: str | None = None,
) -> dict[str, Any]:
    """Run a shipped recipe end to end (prep -> train -> eval), tracked in MLflow.

    Args:
        recipe: a shipped recipe (`flowspeed recipes list`); relative paths in it resolve against the
            deployment's working directory (the checkout).
        overrides: `section.key=value` items, as `flowspeed run --set`, e.g. `train.max_steps=10` or
            `data.manifest=runs/demo/data.jsonl`; values are read as YAML (`[a, b]` is a list).
        workdir: where outputs go; default the recipe's `workdir`.
    """
    logger = get_run_logger()
    cfg = recipe_config(recipe, overrides, workdir)
    logger.info("recipe %s (%s, %s) with %d override(s), workdir %s", recipe, cfg.model.family, cfg.train.engine,
                len(overrides), Path(cfg.workdir).resolve())  # fmt: skip
    out = pipeline(cfg)
    if out.get("prefect_flow_run_id"):
        logger.info("pipeline flow run: %s", prefect_run_url(out["prefect_flow_run_id"]))
    return out
