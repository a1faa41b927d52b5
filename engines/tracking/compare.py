"""Side-by-side numbers for the last runs of an experiment (`flowspeed compare`).

One row per pipeline run, newest first: what it trained (family, variant, recipe, layout, config hash) and how
it did: median throughput of its train run (the median of the per-step `perf/samples_per_s` history: the last
step alone is one noisy sample, often far from the run's pace), final and held-out loss, eval metrics, and the
registry's decision. The same runs compare in the MLflow UI: select them in the experiment and press Compare.

Two kinds of numbers are marked rather than shown as plain results:
- a rerun that reused every stage trained nothing: its row says `reused` and names the run whose figures it
  reused (it logs no metrics of its own, so its cells stay empty);
- a metric from a random-init scorer (a CLIP, FID or FVD network without weights) carries a `*`: it follows
  one setup's progress and is never comparable with a published score.

The table fits an 80-column terminal (short headers, the run id instead of its long name, long names cut with
an ellipsis, never wrapped); `wide=True` shows every column in full.

Reading never creates a store: a sqlite or file URI whose store does not exist is refused (MLflow's client
would otherwise create an empty `mlflow.db` or `mlruns/` where the command ran).
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from flowspeed.evaluation.labels import RANDOM_INIT_TAG
from mlflow import MlflowClient
from rich import box
from rich.table import Table

# per-step metrics of the train run, summarised by their median over the run's history
TRAIN_MEDIANS = ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu")
LOSSES = ("train/final_loss", "eval/val_loss")  # on the pipeline run
# headers of the 80-column table
SHORT: dict[str, str] = {
    "perf/samples_per_s": "smp/s",
    "perf/tokens_per_s": "tok/s",
    "perf/mfu": "mfu",
    "train/final_loss": "loss",
    "eval/val_loss": "val",  # the held-out loss
    "eval/clip_score": "clip",
    "eval/exact_match": "match",
    "eval/wer": "wer",
    "eval/cer": "cer",
    "eval/fid": "fid",
    "eval/fvd": "fvd",
}
# the eval metrics the 80-column table shows: the first two of these present (--wide: all of them)
NARROW_EVAL = ("eval/clip_score", "eval/exact_match", "eval/wer", "eval/fid")
NARROW_EVAL_COLUMNS = 2
RANDOM_INIT_NOTE = "* random-init scorer: tracks this setup only, not comparable with published scores"


def store_path(uri: str) -> Path | None:
    """The local file or folder a sqlite or file URI names; None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(uri.removeprefix("sqlite:///"))) if uri.startswith("sqlite:///") else None
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def require_store(uri: str) -> None:
    """Refuse a local store that does not exist, before any MLflow client could create it."""
    path = store_path(uri)
    if path is not None and not path.exists():
        raise ValueError(
            f"no MLflow store at {path}: nothing to compare there, and compare does not create one. Pass "
            "--workdir DIR (the workdir the runs wrote to: DIR/mlflow.db) or --tracking-uri URI (a server, or "
            "sqlite:///path/to/mlflow.db)."
        )


def _median(client: MlflowClient, run_id: str, key: str) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, key)]
    return statistics.median(values) if values else None


def _registry(tags: dict[str, str]) -> str:
    if "flowspeed.registry.version" in tags:
        return f"v{tags['flowspeed.registry.version']} {tags.get('flowspeed.registry.alias', '')}".strip()
    return "skipped" if "flowspeed.registry.skipped" in tags else ""


def compare_runs(uri: str, experiment: str, last: int = 10) -> list[dict[str, Any]]:
    """The newest `last` pipeline runs of `experiment`, one dict per run: what it is, its metrics (a reused
    run has none of its own), the median per-step throughput of its train run, the registry's decision, what
    it reused from which run, and which of its metrics came from a random-init scorer."""
    require_store(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {known}")
    runs = client.search_runs(
        [exp.experiment_id], "tags.`flowspeed.stage` = 'pipeline'", order_by=["attributes.start_time DESC"],
        max_results=last,
    )  # fmt: skip
    rows = []
    for run in runs:
        train = client.search_runs(
            [exp.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`flowspeed.stage` = 'train'",
            max_results=1,
        )
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            "status": run.info.status,
            "family": tags.get("flowspeed.family", ""),
            "variant": tags.get("flowspeed.variant") or tags.get("flowspeed.model", ""),
            "recipe": tags.get("flowspeed.recipe", ""),  # recipes sharing a workdir share its experiment
            "model": tags.get("flowspeed.model", ""),
            "layout": tags.get("flowspeed.parallel_layout", ""),
            "config_hash": tags.get("flowspeed.config_hash", ""),
            "registry": _registry(tags),
            "reused": tags.get("flowspeed.reused") == "true",
            "reused_stages": [s for s in tags.get("flowspeed.reused_stages", "").split(",") if s],
            "reused_from": tags.get("flowspeed.reused_from_run")
            or next((v for k, v in sorted(tags.items()) if k.startswith("flowspeed.reused_from_run.")), ""),
            "random_init": [m for m in tags.get(RANDOM_INIT_TAG, "").split(",") if m],
        }
        for metric in LOSSES:
            if metric in run.data.metrics:
                row[metric] = run.data.metrics[metric]
        for metric, value in sorted(run.data.metrics.items()):
            if metric.startswith("eval/"):
                row[metric] = value
        if train and not train[0].data.tags.get("flowspeed.reused") == "true":
            for metric in TRAIN_MEDIANS:
                if metric in train[0].data.metrics:
                    row[metric] = _median(client, train[0].info.run_id, metric)
        rows.append(row)
    return rows


def _metric_columns(rows: list[dict[str, Any]], wide: bool) -> list[str]:
    present = {k for r in rows for k in r if "/" in k}
    if wide:
        evals = sorted(k for k in present if k.startswith("eval/") and k not in LOSSES)
        return [m for m in (*TRAIN_MEDIANS, *LOSSES, *evals) if m in present]
    evals = [m for m in NARROW_EVAL if m in present][:NARROW_EVAL_COLUMNS]
    return [m for m in ("perf/samples_per_s", *LOSSES, *evals) if m in present]


def _status(row: dict[str, Any]) -> str:
    if row["reused"]:
        return "reused"
    return {"FINISHED": "done"}.get(row["status"], row["status"].lower())


NARROW_WIDTH = 80
FLOOR = {"family": 6, "variant": 6, "registry": 8}  # the narrowest a shortened name column gets


def _fit(natural: dict[str, int], budget: int) -> dict[str, int] | None:
    """Widths of the name columns within `budget`: the widest one loses a character at a time, none below its
    floor; None when even the floors do not fit."""
    widths = dict(natural)
    while sum(widths.values()) > budget:
        col = max(widths, key=lambda c: widths[c] - FLOOR[c])
        if widths[col] <= FLOOR[col]:
            return None
        widths[col] -= 1
    return widths


def _cells(rows: list[dict[str, Any]], metrics: list[str], wide: bool) -> dict[str, list[str]]:
    """Column -> header and cells, in table order: names, the metrics (`*`: a random-init scorer), registry, status."""
    random_init = {m for r in rows for m in r["random_init"]}
    names = (
        [("run", "run_id"), ("name", "name"), ("started", "started"), ("family", "family"), ("variant", "variant"),
         ("recipe", "recipe"), ("layout", "layout"), ("config", "config_hash")]
        if wide else [("run", "run_id"), ("family", "family"), ("variant", "variant")]
    )  # fmt: skip
    columns = {h: [h, *(r[k] if k != "run_id" or wide else r[k][:8] for r in rows)] for h, k in names}
    for m in metrics:
        header = (m if wide else SHORT.get(m, m.rsplit("/", 1)[-1])) + ("*" if m in random_init else "")
        cells = [f"{r[m]:.4g}" + ("*" if m in r["random_init"] else "") if m in r else "" for r in rows]
        columns[m] = [header, *cells]
    columns["registry"] = ["registry", *(r["registry"] for r in rows)]
    columns["status"] = ["status", *(_status(r) for r in rows)]
    return columns


def compare_table(rows: list[dict[str, Any]], title: str, wide: bool = False) -> tuple[Table, list[str]]:
    """The rows as a rich table plus its footnotes (reused runs, random-init scorers). Narrow (the default) fits
    80 columns on one line per run: run id, family, variant, samples/s, losses, up to two eval metrics, registry,
    status. Numbers are never cut: names shorten with an ellipsis, and an eval column that leaves no room goes
    (--wide has it)."""
    metrics = _metric_columns(rows, wide)
    while True:
        columns = _cells(rows, metrics, wide)
        natural = {c: max(len(v) for v in cells) for c, cells in columns.items()}
        budget = NARROW_WIDTH - 2 * (len(columns) - 1) - 1  # two spaces between columns, one at the end
        budget -= sum(w for c, w in natural.items() if c not in FLOOR)
        names = _fit({c: natural[c] for c in FLOOR}, budget)
        evals = [m for m in metrics if m.startswith("eval/") and m not in LOSSES]
        if wide or names is not None or not evals:
            break
        metrics.remove(evals[-1])
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for c, cells in columns.items():
        numeric = c in metrics
        if wide:  # ids, times and numbers whole; the CLI widens its console to the table
            table.add_column(cells[0], justify="right" if numeric else "left", no_wrap=True)
        else:
            width = (names or {}).get(c, natural[c])
            table.add_column(cells[0], justify="right" if numeric else "left", no_wrap=True, overflow="ellipsis",
                             width=width)  # fmt: skip
    for i in range(len(rows)):
        table.add_row(*(cells[i + 1] for cells in columns.values()))
    notes = []
    for r in rows:
        if r["reused_stages"]:
            source = r["reused_from"] if wide else r["reused_from"][:8]
            source = f"run {source}" if source else "an earlier run"
            what = "it trained nothing: its figures are" if r["reused"] else "those stages' figures are"
            notes.append(f"{r['run_id'][:8]} reused {', '.join(r['reused_stages'])} from {source}; {what} that run's")
    if {m for r in rows for m in r["random_init"]} & set(metrics):
        notes.append(RANDOM_INIT_NOTE)
    hidden = sorted({k for r in rows for k in r if k.startswith("eval/")} - set(metrics) - set(LOSSES))
    if hidden and not wide:
        notes.append(f"not shown at this width: {', '.join(hidden)} (--wide shows every column)")
    return table, notes
