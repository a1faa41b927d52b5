"""The model card in every export folder, read back by huggingface_hub (the Hub's own parser), not by ours.

Exports come from the trainer's own `export_weights` on the untrained tiny quickstart model over the shared
prepped demo data: what the card states (base model, data, config, steps, LoRA, metrics) does not depend on
what the weights learned, and skipping training keeps this file fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.engines.common.io import file_digest
from flowspeed.engines.export import export_weights, plain_model
from flowspeed.engines.model_card import (
    CARD,
    add_eval_results,
    base_license,
    base_model_id,
    card_facts,
    render,
)
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import TEXT_PRESETS, VAE_PRESETS
from huggingface_hub import ModelCard

from tests.conftest import REPO

ARGS = {"text_embed_dim": TEXT_PRESETS["tiny"]["d_model"], "latent_channels": VAE_PRESETS["tiny"]["latent_channels"]}


def _export(cfg: PipelineConfig, out: Path, **kw: int) -> Path:
    family = get_family(cfg.model.family)
    state = plain_model(family, cfg, ARGS).state_dict()  # with the adapters when LoRA is on
    return export_weights(family, cfg, ARGS, state, out, **kw)


def _lora(cfg: PipelineConfig) -> PipelineConfig:
    lora = cfg.train.lora.model_copy(update={"enabled": True, "rank": 4, "alpha": 16.0, "dropout": 0.1})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lora": lora})})


def test_full_export_card_states_data_config_and_steps(prepped: PipelineConfig, tmp_path: Path) -> None:
    final = _export(prepped, tmp_path / "final")
    card = ModelCard.load(final / CARD)
    meta = card.data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-video"
    assert meta["license"] == "unknown"  # random init: no base model whose license a finetune inherits
    assert "base_model" not in meta
    assert {"flowspeed", "cogvideox", "text-to-video"} == set(meta["tags"])
    facts = meta["flowspeed"]
    assert (facts["family"], facts["variant"], facts["engine"]) == ("cogvideox", "preset:tiny", "torch")
    assert facts["steps"] == prepped.train.max_steps == 6
    # The hash of the MLflow tag, and of the config saved beside the weights.
    assert facts["config_hash"] == prepped.config_hash()
    assert facts["config_hash"] == load_config(final / "config.yaml", check=False).config_hash()
    summary = json.loads((prepped.prep_dir / "summary.json").read_text())
    data = facts["data"]
    assert data["digest"] == file_digest(prepped.prep_dir / "samples.jsonl")
    assert (data["num_records"], data["num_samples"], data["num_rejected"]) == (
        summary["num_records"],
        summary["num_samples"],
        summary["num_rejected"],
    )
    assert data["train_samples"] + data["held_out_samples"] == data["num_samples"] == 8
    assert "lora" not in facts and "Not used: a full finetune." in card.text
    assert data["digest"] in card.text and "training steps: 6" in card.text
    assert "Not evaluated yet" in card.text and "model-index" not in meta


def test_eval_metrics_land_in_the_model_index(prepped: PipelineConfig, tmp_path: Path) -> None:
    final = _export(prepped, tmp_path / "final", steps=3)  # a checkpoint's export names its own step
    before = ModelCard.load(final / CARD).data.to_dict()["flowspeed"]
    card = final / CARD  # the user sets the license, as the card asks, before the eval runs
    card.write_text(card.read_text().replace("license: unknown", "license: mit", 1))
    metrics = {"eval/val_loss": 0.25, "eval/clip_score": 21.5, "eval/seconds": 9.0, "eval/fid": float("nan")}
    add_eval_results(final, metrics)
    card = ModelCard.load(final / CARD)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"eval/clip_score": 21.5, "eval/val_loss": 0.25}  # no timings, no NaN
    assert {r.task_type for r in card.data.eval_results} == {"text-to-video"}
    assert card.data.to_dict()["flowspeed"] == before and before["steps"] == 3
    assert card.data.license == "mit"  # kept through the re-render
    assert "| eval/val_loss | 0.25 |" in card.text and "Not evaluated yet" not in card.text
    assert add_eval_results(tmp_path, metrics) is None  # no card there: nothing invented


def test_lora_export_card_states_the_adapter(prepped: PipelineConfig, tmp_path: Path) -> None:
    cfg = _lora(prepped)
    final = _export(cfg, tmp_path / "final")
    card = ModelCard.load(final / CARD)
    meta = card.data.to_dict()
    assert "lora" in meta["tags"]
    lora = meta["flowspeed"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (4, 16.0, 0.1)
    assert lora["target_modules"] == list(get_family("cogvideox").lora_targets)
    assert meta["flowspeed"]["config_hash"] == cfg.config_hash() != prepped.config_hash()
    assert "rank 4, alpha 16, dropout 0.1" in card.text and "`lora/`" in card.text


@pytest.mark.parametrize(
    ("recipe", "task"), [("qwen2_vl-sft", "image-text-to-text"), ("whisper-asr", "automatic-speech-recognition")]
)
def test_transformers_family_card_names_its_library_and_task(recipe: str, task: str, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "pipelines" / f"{recipe}.yaml", workdir=tmp_path)  # nothing prepared here
    family = get_family(cfg.model.family)
    final = export_weights(family, cfg, {}, family.load_transformer(cfg.model).state_dict(), tmp_path / "final")
    card = ModelCard.load(final / CARD)
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", task)
    assert card.data.to_dict()["flowspeed"]["data"] == {}  # no prep folder: no digest or counts made up
    assert "digest and counts unknown" in card.text


def test_base_model_and_license_come_from_the_base_models_own_card(tmp_path: Path) -> None:
    assert base_model_id("THUDM/CogVideoX-2b") == "THUDM/CogVideoX-2b"
    snapshot = tmp_path / "hub" / "models--THUDM--CogVideoX-2b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_id(str(snapshot)) == "THUDM/CogVideoX-2b"
    local = tmp_path / "my-base"
    local.mkdir()
    assert base_model_id(str(local)) is None and base_model_id(None) is None  # a local folder is no Hub id
    assert base_license(str(local)) is None
    (local / CARD).write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n\n# base\n")
    assert base_license(str(local)) == "apache-2.0"


def test_a_finetune_of_a_hub_model_names_it_and_inherits_its_license(prepped: PipelineConfig, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--THUDM--CogVideoX-2b" / "snapshots" / "abc123"  # as the HF cache lays it out
    snapshot.mkdir(parents=True)
    (snapshot / CARD).write_text("---\nlicense: apache-2.0\n---\n\n# CogVideoX-2b\n")
    t = prepped.model.transformer.model_copy(update={"pretrained": str(snapshot), "subfolder": "transformer"})
    cfg = prepped.model_copy(update={"model": prepped.model.model_copy(update={"transformer": t})})
    card = ModelCard(str(render(card_facts(cfg, get_family("cogvideox"), 100, "ft"))))  # the text, parsed again
    assert (card.data.base_model, card.data.license) == ("THUDM/CogVideoX-2b", "apache-2.0")
    assert "- Base model: THUDM/CogVideoX-2b" in card.text
