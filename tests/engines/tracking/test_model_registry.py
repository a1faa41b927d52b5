"""Registry gates: the first version becomes champion; a worse one is a challenger; a better one takes over."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowspeed.configs.schema import GateConfig
from flowspeed.engines.tracking.registry import check_gates, register_and_promote
from mlflow import MlflowClient

GATES = [GateConfig(metric="eval/val_loss", direction="lower", min_improvement=0.01),
         GateConfig(metric="eval/clip_score", direction="higher")]  # fmt: skip


def test_champion_moves_only_when_every_gate_passes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    src = tmp_path.as_uri()
    first = register_and_promote(uri, "m", src, None, {"eval/val_loss": 1.0, "eval/clip_score": 0.20}, GATES)
    assert first.alias == "champion" and first.champion_before is None
    # Better loss, but by less than the required margin: a challenger; the champion stays.
    small = register_and_promote(uri, "m", src, None, {"eval/val_loss": 0.995, "eval/clip_score": 0.25}, GATES)
    assert small.alias == "challenger" and small.champion_before == first.version
    assert any("eval/val_loss" in r and "fails" in r for r in small.reasons)
    assert str(client.get_model_version_by_alias("m", "champion").version) == first.version
    # Lower loss by the margin but a worse CLIP score: still not promoted.
    worse = register_and_promote(uri, "m", src, None, {"eval/val_loss": 0.5, "eval/clip_score": 0.10}, GATES)
    assert worse.alias == "challenger" and any("eval/clip_score" in r and "fails" in r for r in worse.reasons)
    better = register_and_promote(uri, "m", src, None, {"eval/val_loss": 0.8, "eval/clip_score": 0.20}, GATES)
    assert better.alias == "champion" and better.champion_before == first.version
    assert str(client.get_model_version_by_alias("m", "champion").version) == better.version
    assert client.get_model_version("m", worse.version).tags["flowspeed.gate"] == "failed"
    assert "eval/clip_score" in client.get_model_version("m", worse.version).tags["flowspeed.gate_reasons"]


def test_a_candidate_without_the_metric_fails_and_a_champion_without_it_passes() -> None:
    ok, reasons = check_gates({}, {"eval/val_loss": 1.0}, GATES[:1])
    assert not ok and "no value" in reasons[0]
    ok, reasons = check_gates({"eval/val_loss": 1.0}, {}, GATES[:1])
    assert ok and "champion has no value" in reasons[0]


def test_a_gate_takes_its_metric_s_declared_direction_or_asks_for_one() -> None:

    assert GateConfig(metric="eval/wer").direction == "lower"
    assert GateConfig(metric="eval/ai2d/accuracy").direction == "higher"
    assert GateConfig(metric="eval/my_score", direction="higher").direction == "higher"
    with pytest.raises(ValueError, match="no declared direction.*add direction: lower\\|higher"):
        GateConfig(metric="eval/my_score")
