"""The run's summary on its Prefect flow run: a table artifact (what `flowspeed run` prints) and a link
artifact to its MLflow run (`mlflow-pipeline`, made when that run opens: flowspeed.tasks.tracking).

Published by the `pipeline` flow itself, so every way of starting it (`flowspeed run`, the full-config
`flowspeed-pipeline` deployment, the `flowspeed-recipe` deployment's subflow) leaves the same two
artifacts in its flow run's Artifacts tab. A reused stage's figures say they come from the earlier run.
"""

from __future__ import annotations

from typing import Any

from flowspeed.configs import PipelineConfig
from prefect.artifacts import create_table_artifact


def _reused_from(res: dict[str, Any]) -> str:
    """'reused from run X' for a stage result Prefect's cache gave back, naming the run that did the work."""
    source = res.get("reused_from_run")
    return f"reused from run {source}" if source else "reused from an earlier run (which one was not recorded)"


def summary_rows(out: dict[str, Any]) -> list[tuple[str, str]]:
    """What this run did, as (item, value) rows: the CLI's table and the flow run's table artifact. A reused
    stage says which run did its work; its counts, speeds and scores are never shown as this run's."""
    from flowspeed.evaluation.labels import random_init_metrics

    rows: list[tuple[str, str]] = []
    if "mlflow_run_id" in out:
        rows.append(("MLflow run", out["mlflow_run_id"]))
    for stage in ("prep", "train", "eval"):
        if stage in out:  # a rerun with nothing to do opens no stage runs: the pipeline run records the reuse
            res = out[stage]
            reused = f" ({_reused_from(res)})" if res.get("cache_hit") else ""
            rows.append((f"{stage} run", (res.get("mlflow_run_id") or "none") + reused))
    if "prep" in out:
        p = out["prep"]
        if p.get("cache_hit"):
            counts = (f"{p['num_samples']}, {p['num_rejected']} rejected -> {p['rejects']} ({_reused_from(p)}: "
                      "nothing probed or encoded in this run)")  # fmt: skip
        else:
            counts = (f"{p['num_samples']} ({p['num_encoded']} encoded, {p['num_cached']} cached, "
                      f"{p['num_rejected']} rejected -> {p['rejects']})")  # fmt: skip
        rows.append(("samples", counts))
        if p.get("rejected_by_reason") and not p.get("cache_hit"):
            rows.append(("rejected", ", ".join(f"{code}: {n}" for code, n in p["rejected_by_reason"].items())))
        if p.get("num_encoded") and not p.get("cache_hit"):
            rows.append(("prep speed", f"{p['clips_per_s']:.1f} clips/s, {p['frames_per_s']:.0f} frames/s"))
    if "train" in out:
        t = out["train"]
        rows += [("checkpoint", str(t["checkpoint"])), ("export", str(t["final_dir"]))]
        if t.get("losses"):
            loss = f"{t['losses'][0]:.4f} -> {t['losses'][-1]:.4f} over {len(t['losses'])} steps"
            if t.get("cache_hit"):
                rows.append(("loss", f"{loss} ({_reused_from(t)}: nothing trained in this run)"))
            else:
                rows += [("loss", loss), ("throughput", f"{t['samples_per_s']:.1f} samples/s")]
    reused = [s for s in ("prep", "train", "eval") if out.get(s, {}).get("cache_hit")]
    if reused:
        rows.append(("reused", f"{', '.join(reused)}: inputs unchanged and outputs present (Prefect cache)"))
    if "eval" in out:
        e = out["eval"]
        if e.get("cache_hit"):
            rows.append(("eval", f"{_reused_from(e)}: the scores below are that run's"))
        untrained = set(random_init_metrics(e.get("info") or {}))
        for k, v in e["metrics"].items():
            note = " (random-init scorer: tracks this setup only, not comparable with published scores)"
            rows.append((k, f"{v:.4f}" + (note if k in untrained else "")))
        rows.append(("eval samples", ", ".join(e["videos"])))  # media, or a text family's answers
    if "registry" in out:
        r = out["registry"]
        if "skipped" in r:
            rows.append(("registry", f"skipped: {r['skipped']}"))
        else:
            rows.append(("registry", f"{r['model']} version {r['version']} -> {r['alias']}: {'; '.join(r['reasons'])}"))
    return rows


def publish_summary(cfg: PipelineConfig, out: dict[str, Any]) -> None:
    """The summary table on the current flow run (its Artifacts tab), beside the `mlflow-pipeline` link
    artifact the pipeline's MLflow run left there when it opened (flowspeed.tasks.tracking)."""
    rows = [("family", cfg.model.family), ("workdir", str(cfg.workdir)), *summary_rows(out)]
    create_table_artifact(
        [{"item": item, "value": value} for item, value in rows],
        key="flowspeed-run-summary",
        description=f"{cfg.tracking.recipe or cfg.model.family}: what this run did; a reused stage's figures say so",
    )
