"""The eval presets in configs/eval: one per family, each runnable alone with `flowspeed eval` on any model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flowspeed.configs import load_config
from flowspeed.engines.models import known_families
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.engines.tracking.test_serving import _export
from tests.flows.test_recipes import _ai2d_tsv

PRESETS = REPO / "configs" / "eval"


def test_every_family_has_an_eval_preset_that_loads() -> None:
    found = {p.stem: load_config(p) for p in PRESETS.glob("*.yaml")}
    assert set(known_families()) <= set(found), f"families without an eval preset: {set(known_families()) - set(found)}"
    for name, cfg in found.items():
        assert cfg.model.family == name
        assert cfg.eval.model is None  # the user names what to evaluate
        assert cfg.eval.benchmarks or cfg.eval.generation.reference or cfg.eval.split == "all", name


def _eval_dir(workdir: Path, *overrides: str) -> Path:
    return load_config(PRESETS / "qwen2_vl.yaml", list(overrides), workdir).eval_dir


def _flowspeed_eval(workdir: Path, *overrides: str) -> dict:
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    args = ["eval", str(PRESETS / "qwen2_vl.yaml"), "--workdir", str(workdir)]
    for item in overrides:
        args += ["--set", item]
    out = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert out.exit_code == 0, out.output
    return json.loads((_eval_dir(workdir, *overrides) / "metrics.json").read_text())


@pytest.mark.slow
def test_qwen2_vl_preset_scores_ai2d_alone_on_one_and_two_ranks(tmp_path: Path, mlflow_db: Path) -> None:
    """`flowspeed eval configs/eval/qwen2_vl.yaml` on an export folder, nothing prepared or trained in the
    workdir: AI2D scored as logged == recomputed from the logged table, and 2 ranks == 1 rank."""
    for workdir in (tmp_path / "one", tmp_path / "two"):  # each workdir's MLflow store, its schema made once
        workdir.mkdir(exist_ok=True)
        shutil.copyfile(mlflow_db, workdir / "mlflow.db")
    final, _ = _export("qwen2_vl", tmp_path / "model")
    tsv = _ai2d_tsv(tmp_path / "ai2d.tsv", repeat=2)  # 8 items: 4 per rank
    common = [f"eval.model={final}", f"eval.benchmarks=[{{name: ai2d, tsv: {tsv}}}]", "data.height=56",
              "data.width=56", "eval.max_new_tokens=4", "eval.batch_size=2"]  # fmt: skip
    one = _flowspeed_eval(tmp_path / "one", *common)
    two = _flowspeed_eval(tmp_path / "two", *common, "eval.nproc_per_node=2")
    two_dir = _eval_dir(tmp_path / "two", *common, "eval.nproc_per_node=2")
    assert (two_dir / "launch_config.yaml").is_file()  # the second ran as a torchrun job
    assert "eval/val_loss" not in one["metrics"]  # nothing prepared: benchmark scores only
    for key, value in one["metrics"].items():
        if key != "eval/seconds":
            assert two["metrics"][key] == pytest.approx(value, rel=1e-9), key
    one_dir = _eval_dir(tmp_path / "one", *common)
    rows = [(d / "samples" / "benchmark_ai2d.jsonl").read_text() for d in (one_dir, two_dir)]
    assert rows[0] == rows[1]

    client = MlflowClient(f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("flowspeed.stage") == "eval"]  # fmt: skip
    assert run.data.tags["flowspeed.eval_model"] == str(final)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_benchmark_ai2d.json", str(tmp_path)))
                       .read_text())  # fmt: skip
    scores = [row[table["columns"].index("score")] for row in table["data"]]
    assert len(scores) == 8
    assert run.data.metrics["eval/ai2d/accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert {"eval/ai2d/category/shapes", "eval/ai2d/category/colours"} <= set(run.data.metrics)
