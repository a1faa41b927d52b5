"""What every eval task shares, one layer below them: the held-out split, the trained model, the one held-out
loss loop (the family supplies the loss through `training_loss`, as in training) and the answer length.

It imports no other evaluation module, so the generation, answer and benchmark evals all build on it without
importing each other (see evaluation/__init__.py for the layering).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flowspeed.configs import ComponentConfig, PipelineConfig
from flowspeed.datasets_prep.cache import CachedLatents, split_records
from flowspeed.datasets_prep.prep import load_samples
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import Capability, ModelFamily
from torch import nn


def measured(key: str) -> bool:
    """Whether an eval metric (or a sample row's field) measures the run itself — wall time, speed-up, memory —
    rather than what it evaluated: two runs of the same eval differ there, and only there."""
    name = key.removeprefix("eval/")
    return name.endswith("seconds") or name.endswith("speedup") or name.startswith("peak_memory_gb")


def held_out_records(cfg: PipelineConfig) -> list[dict]:
    """The held-out split of the prepared data (all of it with `eval.split: all`); none when an eval of
    `eval.model` runs where nothing was prepared (an eval preset on a registered model): then only the
    benchmarks and samples count."""
    if cfg.eval.model and not (cfg.prep_dir / "samples.jsonl").is_file():
        logging.getLogger(__name__).info("no prepared data under %s: held-out loss skipped", cfg.prep_dir)
        return []
    records = load_samples(cfg.prep_dir)
    return records if cfg.eval.split == "all" else split_records(records, cfg.train.val_fraction)[1]


def trained_model(cfg: PipelineConfig, final_dir: Path) -> nn.Module:
    """The model training exported to `final_dir`, loaded the way the engine builds it (`load_transformer`): a
    diffusion family's denoiser from its pipeline subfolder, a token-loss family's whole model from the folder.
    A checkpoint that opted in to its own modeling code (`trust_remote_code`) keeps the opt-in in its export."""
    family = get_family(cfg.model.family)
    trained = ComponentConfig(
        preset=None,
        pretrained=str(final_dir),
        subfolder=family.denoiser_subfolder or None,
        trust_remote_code=cfg.model.transformer.trust_remote_code,
    )
    return family.load_transformer(cfg.model.model_copy(update={"transformer": trained}), 0, 0)


def _loss_batches(cfg: PipelineConfig, family: ModelFamily, records: list[dict]) -> tuple[list[list[int]], int, int]:
    """(batches of record indices, passes over them, batch size) for the held-out loss.

    A token loss is deterministic and each sample's own mean over its answer tokens: one pass, one sample per
    batch (a padded batch would weight samples by answer length). A denoising loss draws noise and timesteps:
    `eval.val_batches` passes over batches of `train.batch_size` within one bucket, as training draws them (a
    dynamic-resolution or multi-bucket cache holds samples of several shapes, which do not stack)."""
    if family.can(Capability.TOKEN_LOSS):
        return [[i] for i in range(len(records))], 1, 1
    bs = cfg.train.batch_size
    by_bucket: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_bucket.setdefault(repr(family.bucket_key(rec)), []).append(i)
    batches = [idx[s : s + bs] for _, idx in sorted(by_bucket.items()) for s in range(0, len(idx), bs)]
    return batches, cfg.eval.val_batches, bs


@torch.no_grad()
def validation_loss(
    cfg: PipelineConfig, final_dir: Path, device: torch.device, records: list[dict] | None = None
) -> tuple[float, int]:
    """(mean training loss, samples) over the held-out records (default `held_out_records(cfg)`) for the export in
    `final_dir`; (nan, 0) without any. Deterministic: every batch draws its noise from its own fixed seed, so two
    evals of one export, on any device, give the same number."""
    val = held_out_records(cfg) if records is None else records
    if not val:
        return float("nan"), 0
    family = get_family(cfg.model.family)
    model = trained_model(cfg, final_dir).to(device).eval()
    scheduler = family.load_scheduler(cfg.model)
    data = CachedLatents(cfg.cache_dir, val)
    batches, passes, bs = _loss_batches(cfg, family, val)
    losses = []
    for rep in range(passes):
        for b, idx in enumerate(batches):
            batch = {k: v.to(device) for k, v in family.collate([data[i] for i in idx]).items()}
            gen = torch.Generator().manual_seed(cfg.eval.seed * 1000 + rep * 100 + b * bs)
            losses.append(family.training_loss(model, scheduler, batch, gen).item())
    return float(sum(losses) / len(losses)), len(val)


def held_out_metrics(cfg: PipelineConfig, loss: float, samples: int) -> dict[str, float]:
    """`eval/val_loss` and `eval/val_samples`; none for an eval of `eval.model` where nothing was prepared, so a
    registered model's benchmark-only eval logs no NaN loss."""
    return {"eval/val_loss": loss, "eval/val_samples": float(samples)} if samples or not cfg.eval.model else {}


def max_new_tokens(cfg: PipelineConfig) -> int:
    """Tokens an answer (held-out or benchmark) may take: `eval.max_new_tokens`, else a quarter of the text length."""
    return cfg.eval.max_new_tokens or cfg.model.max_text_length // 4 or 16
