"""`flowspeed compare`: the newest pipeline runs of an experiment with their stage metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flowspeed.engines.tracking.compare import RANDOM_INIT_NOTE, compare_runs, compare_table
from flowspeed.evaluation.labels import RANDOM_INIT_TAG
from flowspeed.flows.cli import app
from mlflow import MlflowClient
from mlflow.entities import Metric
from rich.console import Console
from typer.testing import CliRunner


def _pipeline(client: MlflowClient, exp: str, name: str, tags: dict[str, str]) -> str:
    base = {"flowspeed.stage": "pipeline", "flowspeed.family": "cogvideox", "flowspeed.variant": "tiny",
            "flowspeed.model": "tiny", "flowspeed.config_hash": "h"}  # fmt: skip
    run_id = client.create_run(exp, run_name=name, tags=base | tags).info.run_id
    client.set_terminated(run_id)
    time.sleep(0.01)  # distinct start times
    return run_id


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """One store for the module (a new sqlite store costs seconds of migrations): a trained run (throughput
    history, registry champion), a later trained one with a random-init CLIP and
    a long family name, and a rerun that reused everything from the first."""
    tmp_path = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "art").as_uri())
    first = _pipeline(client, exp, "run0", {"flowspeed.parallel_layout": "nproc=1", "flowspeed.registry.version": "1",
                                            "flowspeed.registry.alias": "champion"})  # fmt: skip
    client.log_batch(first, metrics=[Metric("train/final_loss", 0.5, 0, 0), Metric("eval/val_loss", 1.5, 0, 0)])
    train = client.create_run(exp, tags={"flowspeed.stage": "train", "mlflow.parentRunId": first}).info.run_id
    history = [7.4, 7.6, 7.8, 7.5, 51.5]  # the last step alone says 51.5; the run's pace is 7.6
    client.log_batch(train, metrics=[Metric("perf/samples_per_s", v, 0, i) for i, v in enumerate(history)])
    client.create_run(exp, tags={"flowspeed.stage": "eval", "mlflow.parentRunId": first})  # not a row
    second = _pipeline(client, exp, "run1", {"flowspeed.family": "a-family-name-too-long-for-80-columns",
                                             RANDOM_INIT_TAG: "eval/clip_score,eval/clip_cosine"})  # fmt: skip
    client.log_batch(second, metrics=[Metric("eval/val_loss", 1.2, 0, 0), Metric("eval/clip_score", 21.25, 0, 0),
                                      Metric("eval/clip_cosine", 0.2, 0, 0)])  # fmt: skip
    rerun = _pipeline(client, exp, "run2", {"flowspeed.reused": "true", "flowspeed.reused_stages": "prep,train,eval",
                                            "flowspeed.reused_from_run": first})  # fmt: skip
    return uri, [rerun, second, first]


def test_rows_are_newest_first_with_median_throughput_registry_and_reuse(three_runs: tuple[str, list[str]]) -> None:
    uri, ids = three_runs
    rows = compare_runs(uri, "demo", last=5)
    assert [r["run_id"] for r in rows] == ids
    rerun, second, first = rows
    assert first["perf/samples_per_s"] == 7.6  # the median of the history, not the last step's 51.5
    assert first["train/final_loss"] == 0.5 and first["eval/val_loss"] == 1.5 and first["registry"] == "v1 champion"
    assert first["layout"] == "nproc=1" and "eval/clip_score" not in first and not first["reused"]
    assert second["random_init"] == ["eval/clip_score", "eval/clip_cosine"] and second["eval/clip_score"] == 21.25
    assert rerun["reused"] and rerun["reused_from"] == ids[2] and rerun["reused_stages"] == ["prep", "train", "eval"]
    assert not any(k.startswith(("eval/", "train/", "perf/")) for k in rerun)  # no figures claimed as its own
    assert [r["run_id"] for r in compare_runs(uri, "demo", last=1)] == ids[:1]
    with pytest.raises(ValueError, match="experiments there: .*demo"):
        compare_runs(uri, "nope")


def test_table_fits_80_columns_and_wide_shows_everything(three_runs: tuple[str, list[str]]) -> None:
    uri, ids = three_runs
    rows = compare_runs(uri, "demo")
    table, notes = compare_table(rows, "demo: last 3 runs")
    console = Console(width=80, record=True)
    console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "family" in line)
    for column in ("run", "family", "variant", "smp/s", "loss", "val", "clip*", "registry", "status"):
        assert column in header.split(), column
    for run_id in ids:  # one line per run: nothing wrapped
        assert sum(line.startswith(run_id[:8]) for line in lines) == 1
    first = next(line for line in lines if line.startswith(ids[2][:8]))
    assert "7.6" in first and "v1 champion" in first and "done" in first
    assert "21.25*" in next(line for line in lines if line.startswith(ids[1][:8]))
    assert "reused" in next(line for line in lines if line.startswith(ids[0][:8]))
    assert notes == [f"{ids[0][:8]} reused prep, train, eval from run {ids[2][:8]}; it trained nothing: its figures "
                     "are that run's", RANDOM_INIT_NOTE,
                     "not shown at this width: eval/clip_cosine (--wide shows every column)"]  # fmt: skip

    wide, _ = compare_table(rows, "demo", wide=True)
    console = Console(width=400, record=True)
    console.print(wide)
    text = console.export_text()
    for column in ("name", "started", "recipe", "layout", "config", "perf/samples_per_s", "eval/clip_cosine*"):
        assert column in text, column
    assert "a-family-name-too-long-for-80-columns" in text and ids[2] in text


def test_cli_prints_each_column_and_never_creates_a_store(
    three_runs: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, ids = three_runs
    work = Path(uri.removeprefix("sqlite:///")).parent
    before = sorted(work.rglob("*"))
    monkeypatch.chdir(tmp_path)  # an empty folder: compare must leave it so
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner(env={"COLUMNS": "80"})
    shown = runner.invoke(app, ["compare", "demo", "--workdir", str(work)])
    assert shown.exit_code == 0, shown.output
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    for column in ("family", "variant", "smp/s", "loss", "val", "clip*", "registry", "status", "reused"):
        assert column in shown.stdout, column
    as_json = runner.invoke(app, ["compare", "demo", "--workdir", str(work), "--json", "--last", "2"])
    assert [r["run_id"] for r in json.loads(as_json.stdout)] == ids[:2]
    refused = runner.invoke(app, ["compare", "demo"])  # no --workdir: the cwd has no mlflow.db
    assert refused.exit_code == 1
    assert "no MLflow store at" in " ".join(refused.output.replace("│", " ").split())
    missing = runner.invoke(app, ["compare", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'other' / 'm.db'}"])
    assert missing.exit_code == 1
    assert not any(tmp_path.iterdir()) and sorted(work.rglob("*")) == before  # no file or folder written


def test_experiments_are_tagged_as_model_development(three_runs: tuple[str, list[str]], tmp_path: Path) -> None:
    """New and existing experiments (the module's store: `demo` was made without the tag) open on runs and
    metric charts in MLflow 3's UI; a kind someone chose stays."""
    from types import SimpleNamespace

    from flowspeed.engines.tracking.tracker import EXPERIMENT_KIND_TAG, ensure_experiment

    client = MlflowClient(three_runs[0])
    art = (tmp_path / "art").as_uri()
    chosen = client.create_experiment("genai", artifact_location=art, tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("demo", "new", "genai"):
        exp_id = ensure_experiment(client, SimpleNamespace(experiment=name, workdir=tmp_path))
        kind = client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG]
        assert kind == ("genai_development" if exp_id == chosen else "custom_model_development"), name
