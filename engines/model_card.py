"""The model card: `README.md` in every export folder, in the format the Hugging Face Hub reads.

An export is a diffusers or transformers folder that users push to the Hub, load with `from_pretrained`
or hand to a teammate; without a card nobody can tell which base model, data, config and steps made it.
The card is YAML front matter (`license`, `base_model`, `library_name`, `pipeline_tag`, `tags`, and after
an eval `model-index` with the metrics) followed by a Markdown body saying the same for people. The
front matter is made with huggingface_hub's own `ModelCardData`, so the Hub and `ModelCard.load` read it.

    write_model_card(final_dir, cfg, family, steps=cfg.train.max_steps)   # at export (engines/export.py)
    add_eval_results(final_dir, metrics)                                   # after an eval of that export
    ModelCard.load(final_dir / "README.md").data.to_dict()["flowspeed"]    # the facts, machine-readable

Design: the facts known at export (base model, family and variant, data digest and counts, config hash,
steps, LoRA) are computed once, when the weights are written, and kept in the front matter under
`flowspeed:`; the eval, which runs later, adds its metrics by re-rendering the card from those facts.
So a card never states metrics of another model (a previous run's metrics.json is never read), and an
export that was never evaluated says so.
"""

from __future__ import annotations

import json
import math
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.configs.catalog import family_facts
from flowspeed.engines.common.io import atomic_write_text, file_digest, read_jsonl
from flowspeed.engines.models.registry import Capability, ModelFamily
from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD = "README.md"
#: a Hub repository id ("org/name"); a local directory is not one, and the Hub rejects it as `base_model`
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)")  # a snapshot in the HF cache: .../models--org--name/...


def flowspeed_version() -> str:
    try:
        return version("flowspeed")
    except PackageNotFoundError:  # pragma: no cover - a source tree without `pip install -e .`
        return "unknown"


def pipeline_tag(family: ModelFamily) -> str:
    """The Hub's task name for what the family's `generate` / `respond` does."""
    if family.can(Capability.GENERATION):
        if family.conditioning == "image":
            return "image-to-video"
        facts = family_facts(family.name)
        return "text-to-image" if facts is not None and facts.frames == "image" else "text-to-video"
    if family.can(Capability.TRANSCRIPTION):
        return "automatic-speech-recognition"
    return "image-text-to-text"


def base_model_id(pretrained: str | None) -> str | None:
    """The Hub id of the weights training started from: a hub id as given, or the one a local snapshot of
    the HF cache was downloaded from; None for random init or a plain local folder."""
    if not pretrained:
        return None
    if (m := _HF_CACHE_DIR.search(pretrained)) is not None:
        return f"{m.group(1)}/{m.group(2)}"
    if Path(pretrained).expanduser().exists() or not _REPO_ID.match(pretrained):
        return None
    return pretrained


def base_license(pretrained: str | None) -> str | None:
    """The license in the base model's own card, when that card is on this machine (a local folder, or the HF
    cache); a finetune inherits it. Nothing is downloaded: exports happen offline too."""
    if not pretrained:
        return None
    readme: Path | None = Path(pretrained).expanduser() / CARD
    if not readme.is_file():
        from huggingface_hub import try_to_load_from_cache

        repo = base_model_id(pretrained)
        cached = try_to_load_from_cache(repo, CARD) if repo else None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # noqa: BLE001  (someone else's card: unreadable means unknown, not a failed export)
        return None


def _data_facts(cfg: PipelineConfig) -> dict[str, Any]:
    """The prepared data's digest (as the MLflow tag `flowspeed.dataset_digest`) and counts (prep's summary,
    and the train / held-out split training used); empty when the prep folder is not on this machine."""
    samples, summary = cfg.prep_dir / "samples.jsonl", cfg.prep_dir / "summary.json"
    if not samples.is_file():
        return {}
    from flowspeed.datasets_prep.cache import split_records

    facts: dict[str, Any] = {"digest": file_digest(samples)}
    if summary.is_file():
        s = json.loads(summary.read_text())
        facts |= {k: s[k] for k in ("num_records", "num_samples", "num_rejected") if k in s}
    try:
        train, held_out = split_records(read_jsonl(samples), cfg.train.val_fraction)
        facts |= {"train_samples": len(train), "held_out_samples": len(held_out)}
    except ValueError:  # a split training itself would refuse: the counts above still hold
        pass
    return facts


def card_facts(cfg: PipelineConfig, family: ModelFamily, steps: int | None, name: str) -> dict[str, Any]:
    """Everything the card states about how the export was made, as plain data (kept in the front matter)."""
    t, lora = cfg.model.transformer, cfg.train.lora
    facts: dict[str, Any] = {
        "name": name,
        "flowspeed_version": flowspeed_version(),
        "family": cfg.model.family,
        "variant": t.identity(),  # "preset:tiny" (random init) or "pretrained:<id or folder>[/<subfolder>]"
        "pretrained": t.pretrained,  # the weights training started from (a hub id or a folder), None: random init
        "engine": cfg.train.engine,
        "config_hash": cfg.config_hash(),
        "steps": steps,
        "data": _data_facts(cfg),
    }
    if lora.enabled:
        targets = lora.target_modules or list(family.lora_targets)
        facts["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": targets}
    return facts


def _eval_results(task: str, facts: dict[str, Any], metrics: dict[str, float]) -> list[EvalResult]:
    """Metrics as the Hub's `model-index` entries; timings and non-finite values are not results."""
    digest = facts.get("data", {}).get("digest", "unknown")
    dataset = f"held-out split of the prepared data ({digest[:12]})"
    return [
        EvalResult(
            task_type=task,
            dataset_type="flowspeed-prep",
            dataset_name=dataset,
            metric_type=key.removeprefix("eval/"),
            metric_value=float(value),
            metric_name=key,
        )
        for key, value in sorted(metrics.items())
        if isinstance(value, int | float) and math.isfinite(value) and not key.endswith("seconds")
    ]


def _body(meta: ModelCardData, facts: dict[str, Any]) -> str:
    lib, task, data = meta.library_name, meta.pipeline_tag, facts.get("data", {})
    loader = "DiffusionPipeline" if lib == "diffusers" else "AutoModel"
    variant = facts["variant"]
    start = f"random init (`{variant}`)" if variant.startswith("preset:") else f"`{variant.split(':', 1)[1]}`"
    lines = [
        f"# {facts['name']}", "",
        f"A {facts['family']} model ({task}) trained with flowspeed {facts['flowspeed_version']}, saved in the "
        f"{lib} layout: `{loader}.from_pretrained(\"<this folder>\")`, or as an MLflow model "
        "(`mlflow.pyfunc.load_model(\"<this folder>\")`).", "",
        "## Training", "",
        f"- Base model: {meta.base_model or start}",
        f"- Family and variant: `{facts['family']}`, `{variant}`",
        f"- Engine: {facts['engine']}; training steps: {facts['steps'] if facts['steps'] is not None else 'unknown'}",
        f"- Config hash: `{facts['config_hash']}` (of `config.yaml` in this folder; the MLflow tag "
        "`flowspeed.config_hash`)", "",
        "## Data", "",
    ]  # fmt: skip
    if data:
        lines.append(f"- Digest of the prepared samples (`samples.jsonl`, BLAKE2b-128): `{data['digest']}`")
        counts = [
            ("num_records", "manifest records"),
            ("num_samples", "prepared samples"),
            ("num_rejected", "rejected"),
            ("train_samples", "trained on"),
            ("held_out_samples", "held out"),
        ]
        lines += [f"- {label}: {data[k]}" for k, label in counts if k in data]
    else:
        lines.append("- The prepared data was not on the machine that wrote this export: digest and counts unknown.")
    lines += ["", "## LoRA", ""]
    if lora := facts.get("lora"):
        lines += [
            f"- rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}",
            f"- target modules: {', '.join(f'`{m}`' for m in lora['target_modules'])}",
            "- The weights in this folder have the adapter merged; the adapter alone is in `lora/`.",
        ]
    else:
        lines.append("Not used: a full finetune.")
    lines += ["", "## Evaluation", ""]
    shown = {r.metric_name: r.metric_value for r in meta.eval_results or []}
    if shown:
        lines += ["| metric | value |", "| --- | --- |", *(f"| {k} | {v:.6g} |" for k, v in shown.items())]
    else:
        lines.append("Not evaluated yet: `flowspeed eval <config>` adds its metrics here.")
    lines += ["", "## License", ""]
    if meta.license == "unknown":
        lines.append("Unknown to flowspeed (no base-model card with a license was found): set `license:` above "
                     "before publishing; a finetune inherits its base model's license.")  # fmt: skip
    else:
        lines.append(f"`{meta.license}`, from the base model's card: a finetune inherits its base model's license.")
    return "\n".join(lines) + "\n"


def render(facts: dict[str, Any], metrics: dict[str, float] | None = None, license: str | None = None) -> ModelCard:
    """The card for `facts` (from `card_facts`), with `metrics` (an eval's metrics.json) as results; `license`
    overrides the base model's (one a user set in the card before the eval re-rendered it)."""
    from flowspeed.engines.models import get_family

    family = get_family(facts["family"])
    task = pipeline_tag(family)
    pretrained = facts.get("pretrained")
    tags = ["flowspeed", facts["family"], task] + (["lora"] if facts.get("lora") else [])
    meta = ModelCardData(
        license=license or base_license(pretrained) or "unknown",
        base_model=base_model_id(pretrained),
        # a diffusers pipeline folder keeps the trained model in a subfolder; a transformers export is the model
        library_name="diffusers" if family.denoiser_subfolder else "transformers",
        pipeline_tag=task,
        tags=tags,
        model_name=facts["name"],
        eval_results=_eval_results(task, facts, metrics or {}) or None,
        flowspeed=facts,
    )
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{_body(meta, facts)}")


def card_name(cfg: PipelineConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.workdir.name}-{cfg.model.family}"


def write_model_card(
    export_dir: Path, cfg: PipelineConfig, family: ModelFamily, *, steps: int | None, name: str | None = None
) -> Path:
    """Write `README.md` into `export_dir` (atomically: a reader sees the old card or the new one)."""
    card = render(card_facts(cfg, family, steps, name or card_name(cfg)))
    return atomic_write_text(Path(export_dir) / CARD, str(card))


def add_eval_results(export_dir: Path, metrics: dict[str, float]) -> Path | None:
    """Re-render the export's card with an eval's metrics; None when the folder has no flowspeed card (an
    export made before cards existed, or someone else's folder: nothing to refresh)."""
    path = Path(export_dir) / CARD
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    facts = card.data.to_dict().get("flowspeed")
    if not facts:
        return None
    kept = card.data.license if card.data.license != "unknown" else None  # a license a user set stays
    return atomic_write_text(path, str(render(facts, metrics, kept)))
