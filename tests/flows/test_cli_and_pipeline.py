"""The product's front door: the `flowspeed` CLI, the pipeline flow, MLflow and Prefect records."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from flowspeed.configs import load_config
from huggingface_hub import ModelCard
from mlflow import MlflowClient

from tests.conftest import REPO


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def flowspeed(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowspeed.flows.cli", *args],
        cwd=REPO,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )


def flowspeed_started(*args: str, workdir: Path) -> subprocess.Popen:
    """`flowspeed` started in the background (its outputs piped), for `finished` to collect: a command whose
    result is checked later runs while the test does something else (a 2-core machine has a core to spare)."""
    return subprocess.Popen([sys.executable, "-m", "flowspeed.flows.cli", *args], cwd=REPO, env=_env(workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_bad_config_key_fails_with_one_readable_paragraph(tmp_path: Path) -> None:
    out = flowspeed(
        "run", "configs/quickstart.yaml", "--workdir", str(tmp_path), "--set", "train.max_step=3", workdir=tmp_path
    )
    assert out.returncode == 1
    assert "unknown key `train.max_step`" in out.stderr and "max_steps" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    data, work = tmp_path / "demo", tmp_path / "work"
    made = flowspeed("demo-data", str(data), workdir=work)
    assert made.returncode == 0, made.stderr
    manifest = data / "data.jsonl"
    assert len(manifest.read_text().splitlines()) == 20

    run = flowspeed(
        "run", "configs/quickstart.yaml", "--workdir", str(work), "--set", f"data.manifest={manifest}", workdir=work
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MLflow run" in run.stdout and "mlflow ui --backend-store-uri" in run.stderr
    assert "prefect server start" in run.stderr
    # The quickstart's CLIP has no weights: its score is labelled wherever it is shown.
    said = " ".join(run.stdout.replace("│", " ").split())  # the summary table folds long cells
    assert "random-init scorer" in said.split("eval/clip_score", 1)[1][:80], said

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"data.manifest={manifest}"], work)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"flowspeed-{work.name}")  # the workdir's experiment
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs, not traces
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flowspeed.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {
        r.data.tags["flowspeed.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"prep", "train", "eval"}
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    assert all(r.data.tags["flowspeed.reused"] == "false" for r in children.values())
    assert parent.data.params["train.max_steps"] == "30"

    train_run = children["train"]
    losses = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 31))
    for name in ("perf/samples_per_s", "perf/frames_per_s", "perf/tokens_per_s", "train/lr"):
        assert len(client.get_metric_history(train_run.info.run_id, name)) == 30
    ckpt = Path(train_run.data.tags["flowspeed.checkpoint_path"])
    assert (ckpt / "state" / ".metadata").is_file() and ckpt.is_relative_to(work)
    # The export reads only the checkpoint, which nothing below changes: it runs while the checks and the rerun do.
    exporting = flowspeed_started("export", str(ckpt), "--out", str(tmp_path / "release"), workdir=work)
    model_files = [f.path for f in client.list_artifacts(train_run.info.run_id, "model")]
    assert "model/model_index.json" in model_files and "model/transformer" in model_files

    prep_run = client.get_run(children["prep"].info.run_id)
    assert prep_run.inputs.dataset_inputs, "the prep manifest is logged with log_input"
    assert prep_run.data.metrics["prep/num_samples"] == 20
    assert "prep/contact_sheet.png" in [f.path for f in client.list_artifacts(prep_run.info.run_id, "prep")]
    assert {"path": "prep_samples.json", "type": "table"} in json.loads(prep_run.data.tags["mlflow.loggedArtifacts"])
    assert prep_run.data.tags["flowspeed.prep_preview"].startswith("20 of 20 samples")

    eval_run = children["eval"]
    videos = [f.path for f in client.list_artifacts(eval_run.info.run_id, "videos")]
    assert videos == ["videos/sample_00.mp4", "videos/sample_01.mp4"]
    for key in ("eval/val_loss", "eval/clip_score"):
        assert key in eval_run.data.metrics and key in parent.data.metrics
    for run_ in (eval_run, parent):
        assert "eval/clip_score" in run_.data.tags["flowspeed.eval.random_init_metrics"].split(",")
    for path in (cfg.prep_dir / "config.yaml", cfg.train_dir / "config.yaml", cfg.eval_dir / "config.yaml",
                 cfg.train_dir / "final" / "model_index.json"):  # fmt: skip
        assert path.is_file() and path.is_relative_to(work), path

    # Run again: nothing new to encode or train; Prefect's cache (outputs still present) reuses the work.
    again = flowspeed(
        "run", "configs/quickstart.yaml", "--workdir", str(work), "--set", f"data.manifest={manifest}", workdir=work
    )
    # The sharded checkpoint becomes a release folder; a wrong path is one readable paragraph (in-process: the
    # same command and handler, without a second interpreter's imports).
    exported = finished(exporting)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "release" / "model_index.json").is_file()
    card = ModelCard.load(tmp_path / "release" / "README.md")  # a model card, with the checkpoint's own step
    assert card.data.to_dict()["flowspeed"]["steps"] == int(ckpt.name.removeprefix("step-"))
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    bad = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    said = " ".join(bad.stderr.replace("│", " ").split())  # the error box wraps lines where the path length puts them
    assert bad.exit_code == 1 and "not a checkpoint directory" in said and "Traceback" not in bad.stderr

    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stdout and "prep, train, eval" in again.stdout
    said = " ".join(again.stdout.replace("│", " ").split())
    assert f"reused from run {children['prep'].info.run_id}" in said and "encoded," not in said
    assert f"reused from run {train_run.info.run_id}: nothing trained in this run" in said
    assert "samples/s" not in said and "clips/s" not in said  # no speed of work this run did not do
    summary = json.loads((cfg.prep_dir / "summary.json").read_text())
    assert summary["num_encoded"] == 20  # untouched: the cached prep task did not run again
    # Decided before any stage flow: no stage runs; the pipeline's MLflow run records the reuse and the run that
    # trained the model, its Prefect flow run the three stage tasks as cache hits.
    rerun = next(r for r in client.search_runs([exp.experiment_id], "tags.`flowspeed.stage` = 'pipeline'")
                 if r.info.run_id != parent.info.run_id)  # fmt: skip
    reuse = {k: v for k, v in rerun.data.tags.items() if k.startswith("flowspeed.reused")}
    assert reuse == {
        "flowspeed.reused": "true",
        "flowspeed.reused_stages": "prep,train,eval",
        "flowspeed.reused_from_run": parent.info.run_id,  # the pipeline run with the figures
        **{f"flowspeed.reused_from_run.{stage}": children[stage].info.run_id for stage in ("prep", "train", "eval")},
    }
    assert rerun.data.metrics == {}  # a rerun creates no metrics that claim new work
    assert not client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'")
    # Both Prefect flow runs behind the MLflow runs, read back from the workdir's Prefect database in one process
    # (each start of the embedded server costs seconds): the first run's state and artifacts, the rerun's tasks.
    flow_run_id = parent.data.tags["flowspeed.prefect.flow_run_id"]
    # `flowspeed compare` reads only MLflow: it runs while Prefect's database is read.
    comparing = flowspeed_started("compare", f"flowspeed-{work.name}", "--workdir", str(work), "--json", workdir=work)
    check = (
        "import sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "with get_client(sync_client=True) as c:\n"
        "    fr = c.read_flow_run(sys.argv[1]); print('state', fr.state.type.value, fr.name)\n"
        "    for a in c.read_artifacts(): print('artifact', a.key, a.data)\n"
        "    runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[2]])))\n"
        "    for t in runs: print('task', t.task_key.rsplit('-', 1)[0], t.state.name)\n"
    )
    # Prefect's own ephemeral start timeout (20 s) is too short on a busy CI machine
    env = _env(work) | {
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    read = subprocess.run([sys.executable, "-c", check, flow_run_id, rerun.data.tags["flowspeed.prefect.flow_run_id"]],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line.split(" ", 1) for line in read.stdout.splitlines()]
    said = {kind: [rest for k, rest in lines if k == kind] for kind in ("state", "artifact", "task")}
    assert said["state"] and said["state"][0].split()[0] == "COMPLETED", read.stdout + read.stderr[-2000:]
    links = [line for line in said["artifact"] if line.startswith("mlflow-pipeline ")]
    assert any(parent.info.run_id in link for link in links)  # the MLflow run link is a Prefect artifact (each run's)
    tables = [line for line in said["artifact"] if line.startswith("flowspeed-run-summary ")]
    assert any("20 encoded" in t and "eval/val_loss" in t for t in tables)  # the CLI's summary, as a table artifact
    states = dict(line.split() for line in said["task"])
    assert {k: states.get(k) for k in ("prep_latents", "train_model", "evaluate_model")} == dict.fromkeys(
        ("prep_latents", "train_model", "evaluate_model"), "Cached"
    ), read.stdout + read.stderr[-2000:]

    # What a run is, searchable: family, model, layout, config hash, dataset digest, commit, Prefect link.
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["flowspeed.family"] == "cogvideox" and tags["flowspeed.model"] == "tiny"
    assert len(tags["flowspeed.config_hash"]) == 16 and len(tags["flowspeed.dataset_digest"]) >= 16
    assert "tp=1" in tags["flowspeed.parallel_layout"] and tags["flowspeed.prefect.flow_run_url"].endswith(flow_run_id)
    assert tags["mlflow.source.git.commit"]
    assert "cogvideox-tiny" in parent.info.run_name
    # Every tag flowspeed writes is under one prefix (MLflow's own, mlflow.*, aside), on every run of both runs.
    for r in client.search_runs([exp.experiment_id]):
        stray = [k for k in r.data.tags if not k.startswith(("flowspeed.", "mlflow."))]
        assert not stray, (r.data.tags.get("flowspeed.stage"), stray)
    # Both pipeline runs side by side, newest first.
    cmp = finished(comparing)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    rows = json.loads(cmp.stdout)
    assert len(rows) == 2 and rows[1]["run_id"] == parent.info.run_id
    assert rows[1]["eval/val_loss"] == pytest.approx(parent.data.metrics["eval/val_loss"])
    speeds = [m.value for m in client.get_metric_history(train_run.info.run_id, "perf/samples_per_s")]
    assert rows[1]["perf/samples_per_s"] == pytest.approx(statistics.median(speeds))  # not the last step's
    assert rows[0]["reused"] and rows[0]["reused_from"] == parent.info.run_id  # not a new training result
    assert not any(k.startswith(("eval/", "train/", "perf/")) for k in rows[0])


@pytest.mark.slow
def test_a_stage_failing_inside_its_flow_is_one_paragraph(tmp_path: Path) -> None:
    out = flowspeed("train", "configs/quickstart.yaml", "--workdir", str(tmp_path), workdir=tmp_path)
    assert out.returncode == 1
    assert "flowspeed train failed" in out.stderr and "run `flowspeed prep` first" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_sd3_quickstart_runs_through_the_same_pipeline(tmp_path: Path, demo_manifest: Path) -> None:
    work = tmp_path / "sd3"
    # two steps and one sample of one denoising step: what is checked is the image family's path, not its quality
    sets = [f"data.manifest={demo_manifest}", "train.max_steps=2", "train.warmup_steps=0",
            "eval.prompts=[a red circle]", "eval.num_inference_steps=1"]  # fmt: skip
    run = flowspeed("run", "configs/sd3-quickstart.yaml", "--workdir", str(work),
                    *(a for s in sets for a in ("--set", s)), workdir=work)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flowspeed-sd3")  # the workdir's
    (eval_run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("flowspeed.stage") == "eval"]
    assert [f.path for f in client.list_artifacts(eval_run.info.run_id, "videos")][0].endswith(".png")
    cfg = load_config(REPO / "configs" / "sd3-quickstart.yaml", sets, work)
    assert (cfg.train_dir / "final" / "model_index.json").read_text().count("StableDiffusion3Pipeline") == 1
