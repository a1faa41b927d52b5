"""Every recipe in configs/pipelines runs end to end on its tiny preset: prep -> train -> eval, tracked.

The default run keeps one recipe of each kind (generation, understanding, speech); the rest are slow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from flowspeed.configs import load_config
from flowspeed.configs.schema import BenchmarkConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.sequence import SequenceFamily
from flowspeed.engines.tracking.tracker import tracking_uri
from mlflow import MlflowClient

from tests.conftest import REPO

# Recipes with their own, fuller test are not run twice: qwen2_vl-sft-megatron (tests/flows/test_megatron_recipe.py),
# qwen3_vl_moe-sft (2 FSDP2 ranks against one process, tests/engines/models/test_qwen3_vl.py)
OWN_TEST = {"qwen2_vl-sft-megatron", "qwen3_vl_moe-sft"}
RECIPES = sorted(p for p in (REPO / "configs" / "pipelines").glob("*.yaml") if p.stem not in OWN_TEST)
DEFAULT = {"cogvideox-t2v", "qwen2_vl-sft", "whisper-asr"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowspeed.datasets_prep.demo import make_demo_audio, make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_videos=6, num_images=2)
    make_demo_audio(root, num_clips=6)
    return root


def _ai2d_tsv(path: Path, repeat: int = 1) -> Path:
    """Four AI2D-style items (x repeat) in VLMEvalKit's layout: base64 PNGs, options A-D, answer letter, category."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    rows = []
    for i, (colour, answer) in enumerate([("red", "A"), ("green", "B"), ("blue", "C"), ("red", "A")] * repeat):
        png = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(png, format="PNG")
        rows.append({"index": i, "image": base64.b64encode(png.getvalue()).decode(), "question": "Which colour?",
                     "A": "red", "B": "green", "C": "blue", "D": "black", "answer": answer,
                     "category": "shapes" if i % 4 < 2 else "colours"})  # fmt: skip
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_every_family_has_a_recipe() -> None:
    from flowspeed.engines.models import known_families

    names = {p.stem.split("-")[0] for p in RECIPES}
    assert set(known_families()) <= names, f"families without a recipe: {set(known_families()) - names}"


@pytest.mark.parametrize(
    "recipe", [pytest.param(p, id=p.stem, marks=() if p.stem in DEFAULT else pytest.mark.slow) for p in RECIPES]
)
def test_recipe_runs_end_to_end(recipe: Path, demo: Path, mlflow_db: Path, tmp_path: Path) -> None:
    from flowspeed.flows.pipeline import pipeline

    # Shorter than a user's run where no check looks: 4 steps, one fixed-noise pass for the held-out loss, one
    # prompt sampled in 2 steps (still a multistep loop), 4-token answers. Every stage still runs and is tracked.
    short = ["train.max_steps=4", "train.checkpoint_every=4", "eval.val_batches=1", "eval.num_inference_steps=2",
             "eval.max_new_tokens=4"]  # fmt: skip
    cfg = load_config(recipe, short, workdir=tmp_path)
    assert tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"  # the workdir's own store
    shutil.copyfile(mlflow_db, tmp_path / "mlflow.db")  # its schema made once (conftest), not per recipe
    family = get_family(cfg.model.family)
    manifest = Path(cfg.data.manifest).name  # data.jsonl, conversations.jsonl or audio.jsonl of the demo
    eval_ = cfg.eval.model_copy(update={"prompts": cfg.eval.prompts[:1]})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": demo / manifest}), "eval": eval_})
    if recipe.stem == "qwen2_vl-sft":  # and a benchmark: an AI2D-style TSV scored on the export
        bench = [BenchmarkConfig(name="ai2d", tsv=_ai2d_tsv(tmp_path / "ai2d.tsv"))]
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"benchmarks": bench})})
    out = pipeline(cfg)
    assert out["prep"]["num_samples"] > 0
    assert len(out["train"]["losses"]) == 4 and all(math.isfinite(x) for x in out["train"]["losses"])
    final = Path(out["train"]["final_dir"])
    assert all(p.is_file() for p in family.export_files(final))
    if cfg.train.lora.enabled:
        assert (final / "lora" / "adapter_model.safetensors").is_file()
    if cfg.train.packing.max_tokens:  # packed rows hold no pad token; tokens/s counts only real ones
        train_run = MlflowClient(out["tracking_uri"]).get_run(out["train"]["mlflow_run_id"])
        assert train_run.data.metrics["perf/padding_ratio"] == 0.0 and train_run.data.metrics["perf/tokens_per_s"] > 0
    metrics = json.loads((cfg.eval_dir / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["eval/val_loss"])
    if isinstance(family, SequenceFamily):  # answers (or transcripts) of held-out samples, as text
        rows = [json.loads(line) for line in (cfg.eval_dir / "samples" / "responses.jsonl").read_text().splitlines()]
        assert rows and all(isinstance(r["response"], str) and r["reference"] for r in rows)
        if family.kind == "speech":  # corpus WER after Whisper's normaliser, recomputed from the logged rows
            from flowspeed.evaluation.speech_metrics import wer

            assert metrics["eval/wer"] == pytest.approx(
                wer([r["reference"] for r in rows], [r["response"] for r in rows])
            )
            assert all(0 <= r["cer"] for r in rows) and "eval/cer" in metrics
    client = MlflowClient(out["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    by_stage = {r.data.tags.get("flowspeed.stage"): r for r in runs}
    assert {"pipeline", "prep", "train", "eval"} <= set(by_stage)
    # Per-sample eval rows as an MLflow table: answers for text families, generated files otherwise.
    table = client.download_artifacts(by_stage["eval"].info.run_id, "eval_samples.json", str(tmp_path))
    columns = json.loads(Path(table).read_text())["columns"]
    assert ("response" if isinstance(family, SequenceFamily) else "sample") in columns
    if cfg.eval.benchmarks:  # accuracy as logged == accuracy recomputed from the logged per-item table
        table = json.loads(Path(client.download_artifacts(by_stage["eval"].info.run_id, "eval_benchmark_ai2d.json",
                                                          str(tmp_path))).read_text())  # fmt: skip
        scores = [row[table["columns"].index("score")] for row in table["data"]]
        assert len(scores) == 4
        assert by_stage["eval"].data.metrics["eval/ai2d/accuracy"] == pytest.approx(sum(scores) / len(scores))
        assert "eval/ai2d/category/shapes" in by_stage["eval"].data.metrics
        # where the score differs from VLMEvalKit's by design, the run says so (docs/fidelity.md, benchmarks)
        assert "without its default LLM judge" in by_stage["eval"].data.tags["flowspeed.eval.ai2d.answer_matching"]
