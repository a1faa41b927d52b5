"""The pipeline registers each run's export; the gates pick the alias; the decision is on both UIs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import make_config


@pytest.mark.slow
def test_pipeline_registers_versions_and_gates_the_champion(tmp_path: Path, demo_manifest: Path) -> None:
    from flowspeed.flows.pipeline import pipeline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    common = [f"data.output_dir={tmp_path / 'prep'}", "train.max_steps=3", "train.checkpoint_every=3",
              "tracking.registry.enabled=true", "tracking.registry.model_name=quick",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
              # one sample of one denoising step per eval: the gates read eval/val_loss, not the samples
              "model.max_text_length=32", 'eval.prompts=["a red circle"]', "eval.num_inference_steps=1"]  # fmt: skip
    first = pipeline(make_config(tmp_path / "a", demo_manifest, *common))
    assert first["registry"]["alias"] == "champion" and first["registry"]["version"] == "1"
    # A gate no run can pass (an improvement of 1e9 in held-out loss): the new version is a challenger.
    impossible = 'tracking.registry.gates=[{"metric": "eval/val_loss", "direction": "lower", "min_improvement": 1e9}]'
    second = pipeline(make_config(tmp_path / "b", demo_manifest, *common, impossible))
    assert second["registry"]["alias"] == "challenger" and second["registry"]["champion_before"] == "1"
    assert "fails" in second["registry"]["reasons"][0]

    client = MlflowClient(second["tracking_uri"])
    assert str(client.get_model_version_by_alias("quick", "champion").version) == "1"
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["flowspeed.registry.alias"] == "challenger"
    assert "min_improvement" not in run.data.tags["flowspeed.registry.reasons"]  # the reason, in words
    assert "required 1e+09" in run.data.tags["flowspeed.registry.reasons"]
    version = client.get_model_version("quick", "2")
    assert float(version.tags["metric.eval/val_loss"]) == pytest.approx(run.data.metrics["eval/val_loss"])
    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["registry-decision"])))
    assert any("challenger" in (a.data or "") for a in arts)

    # The nightly finetune: new files land in data.incoming; the run encodes only those and starts
    # from the champion's weights, in a training dir of its own (not the last run's finished one).
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    clip = next(demo_manifest.parent.glob("videos/*.mp4"))
    shutil.copy(clip, incoming / "new.mp4")
    (incoming / "new.txt").write_text("a brand new clip for tonight's finetune")
    nightly = pipeline(make_config(tmp_path / "c", demo_manifest, *common, "train.init_from=champion",
                                   f"data.incoming={incoming}"))  # fmt: skip
    assert nightly["prep"]["num_encoded"] == 1 and nightly["prep"]["num_cached"] == first["prep"]["num_samples"]
    parent = client.get_run(nightly["mlflow_run_id"])
    assert parent.data.tags["flowspeed.init_from"] == "models:/quick@champion (version 1)"
    final = Path(nightly["train"]["final_dir"])
    assert final.parent.name.startswith("from-quick-v1-") and len(nightly["train"]["losses"]) == 3
    champion_weights = (tmp_path / "c" / ".champion" / "quick" / "v1" / "transformer").glob("*.safetensors")
    assert next(champion_weights).stat().st_size > 0
    assert nightly["registry"]["version"] == "3"
    # `flowspeed eval` alone, with the nightly config as written, evaluates what that finetune made.
    from flowspeed.evaluation.exports import trained_export

    nightly_cfg = make_config(tmp_path / "c", demo_manifest, *common, "train.init_from=champion",
                              f"data.incoming={incoming}")  # fmt: skip
    assert trained_export(nightly_cfg) == final

    # Any registered version (an alias pinned to its version) or a training checkpoint, evaluated alone.
    from flowspeed.flows.stages import evaluate

    champion = str(client.get_model_version_by_alias("quick", "champion").version)
    by_alias = evaluate(make_config(tmp_path / "e", demo_manifest, *common, "eval.model=models:/quick@champion"))
    assert client.get_run(by_alias["mlflow_run_id"]).data.tags["flowspeed.eval_model"] == f"models:/quick/{champion}"
    assert (tmp_path / "e" / ".registry" / "quick" / f"v{champion}" / "MLmodel").is_file()
    checkpoint = first["train"]["checkpoint"]
    from_ckpt = evaluate(make_config(tmp_path / "f", demo_manifest, *common, f"eval.model={checkpoint}"))
    assert from_ckpt["metrics"]["eval/val_loss"] > 0 and from_ckpt["videos"]
    with pytest.raises(Exception, match="not in the registry"):
        evaluate(make_config(tmp_path / "g", demo_manifest, *common, "eval.model=models:/quick/99"))
