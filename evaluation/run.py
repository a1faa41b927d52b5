"""The eval stage: the held-out loss, then what the family can do (`family.can`): generated samples and their
metrics (GENERATION), answers or transcripts and benchmark scores (ANSWERS, TRANSCRIPTION), for a trained
export, a checkpoint or a registered version.

With `eval.nproc_per_node > 1` it runs as a torchrun job (`python -m flowspeed.evaluation.run`): samples and
benchmark items are split across the ranks and gathered on rank 0 (evaluation/sharded.py), which
writes the outputs. Every task keeps per-item rows as it goes, so a killed eval resumes.

Outputs under `cfg.eval_dir`: videos/sample_XX.mp4 (generation), samples/*.jsonl (one row per sample
or item), metrics.json, config.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig, load_config, save_config
from flowspeed.engines.common.device import resolve_device
from flowspeed.engines.common.io import atomic_write_text, write_jsonl
from flowspeed.engines.common.torchrun import in_distributed_job, run_torchrun
from flowspeed.engines.model_card import add_eval_results
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import Capability, ModelFamily, keep_loaded, sampling_setup
from flowspeed.engines.torch_engine.sampling import SamplingLayout, SamplingSetup, sampling_mesh
from flowspeed.engines.torch_engine.step_cache import sampling_extra
from flowspeed.evaluation.common import held_out_metrics, held_out_records, validation_loss
from flowspeed.evaluation.exports import trained_export
from flowspeed.evaluation.rewards import Reward, build_reward
from flowspeed.evaluation.sharded import Ranks, join
from torch.distributed.elastic.multiprocessing.errors import record


@dataclass
class EvalResult:
    eval_dir: str
    metrics: dict[str, float]
    videos: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)  # labels for the run's tags, e.g. fid_features

    def as_dict(self) -> dict:
        return asdict(self)


def run_eval(cfg: PipelineConfig, final_dir: Path | None = None) -> EvalResult:
    t0 = time.perf_counter()
    final_dir = Path(final_dir or trained_export(cfg))
    family = get_family(cfg.model.family)
    if not family.export_files(final_dir)[0].is_file():
        raise FileNotFoundError(
            f"no exported model at {final_dir}: run `flowspeed train` first, or set eval.model (a models:/ URI, "
            "a training checkpoint or an export folder)"
        )
    out = cfg.eval_dir
    if not in_distributed_job():  # before any rank writes: the launcher (or the lone process) sweeps once
        clear_dead_temp_files(out)
    if cfg.eval.nproc_per_node > 1 and not in_distributed_job():
        (out / "metrics.json").unlink(missing_ok=True)  # never read a previous eval's result as this one's
        path = save_config(cfg, out, "launch_config.yaml")
        run_torchrun("flowspeed.evaluation.run", ["--config", str(path), "--final-dir", str(final_dir)],
                     cfg.eval.nproc_per_node)  # fmt: skip
        return EvalResult(**json.loads((out / "metrics.json").read_text()))
    device = resolve_device(cfg.train.device)
    layout = sampling_layout(cfg, family)
    ranks = join(device, group=layout.group)
    mesh = sampling_mesh(layout, device)  # None for one rank
    if cfg.eval.cache.on and not family.can(Capability.GENERATION):
        raise ValueError(f"eval.cache caches a denoiser's steps; {family.name} does not generate media: remove it")
    extra = sampling_extra(cfg.eval.cache, mesh)
    setup = SamplingSetup(layout, mesh, extra) if layout.world > 1 or extra is not None else None
    # each export, CLIP and feature extractor loads once for all batches; denoisers are split as eval.parallel says
    # and step-cached as eval.cache says
    with keep_loaded(), sampling_setup(setup):
        metrics, paths, info = _evaluate(cfg, family, final_dir, device, ranks)
    if not ranks.main:
        return EvalResult(str(out), {}, [])
    save_config(cfg, out)
    metrics["eval/seconds"] = time.perf_counter() - t0
    result = EvalResult(str(out), metrics, paths, info)
    atomic_write_text(out / "metrics.json", json.dumps(result.as_dict(), indent=2))
    if not cfg.eval.model:  # this config's own export: its model card gains the metrics (a registry version,
        add_eval_results(final_dir, metrics)  # a checkpoint or another folder is someone else's: left alone)
    shutil.rmtree(out / ".partial", ignore_errors=True)  # done: the per-item shards served their purpose
    return result


def sampling_layout(cfg: PipelineConfig, family: ModelFamily) -> SamplingLayout:
    """`eval.parallel` as a layout; CFG / context parallelism split a generated sample, so only a generating
    family takes them (the config checked dp x cfg x cp = nproc_per_node at load)."""
    layout = SamplingLayout.of(cfg.eval.parallel, cfg.eval.nproc_per_node)
    if layout.group > 1 and not family.can(Capability.GENERATION):
        raise ValueError(
            f"eval.parallel: cfg={layout.cfg} x cp={layout.cp} splits one generated sample across ranks; {family.name} "
            "does not generate media, so its eval ranks can only split items: set eval.parallel.cfg and cp to 1"
        )
    return layout


def clear_dead_temp_files(out: Path) -> list[Path]:
    """Remove the temp files (`.<name>.<random>.tmp`, from atomic writes) that a killed eval left in its
    output folders. They are never read as results, but the videos folder is logged to MLflow whole, so a
    resumed eval would upload a dead run's half-published sample beside the real ones. Called before an
    eval writes anything: two evals writing one eval_dir at once are not supported (metrics.json too)."""
    removed = [p for d in (out, out / "videos", out / "samples") if d.is_dir() for p in d.glob(".*.tmp")]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _evaluate(
    cfg: PipelineConfig, family: ModelFamily, final_dir: Path, device: torch.device, ranks: Ranks
) -> tuple[dict[str, float], list[str], dict[str, str]]:
    """(metrics, output paths, run tags) on rank 0; empty elsewhere. The held-out loss for every family (rank 0),
    then what the family can do: generated samples and their metrics, answers or transcripts and benchmarks."""
    # imported here: CLIP (open_clip, torchvision) and the benchmark code load only when an eval runs, not when a
    # pipeline checks whether its cached eval is still current (trained_export)
    from flowspeed.evaluation.generation_eval import generate_and_score
    from flowspeed.evaluation.sequence_eval import run_sequence_eval

    val = held_out_records(cfg) if ranks.main else []
    loss, n_val = validation_loss(cfg, final_dir, device, val) if ranks.main else (float("nan"), 0)
    metrics = held_out_metrics(cfg, loss, n_val)
    paths: list[str] = []
    info: dict[str, str] = {}
    reward = eval_reward(cfg, family, device)
    if family.can(Capability.GENERATION):
        scores, rows, gen_info = generate_and_score(cfg, family, final_dir, device, ranks, reward)
        if ranks.main:
            write_jsonl(cfg.eval_dir / "samples" / "generation.jsonl", rows)
            metrics |= scores
            paths += [str(cfg.eval_dir / "videos" / r["sample"]) for r in rows]
            info |= gen_info
    if family.can(Capability.ANSWERS) or family.can(Capability.TRANSCRIPTION):
        res = run_sequence_eval(cfg, family, final_dir, val, device, ranks, reward)
        metrics |= res["metrics"]
        paths += res["paths"]
        info |= res.get("info", {})
    return (metrics, paths, info) if ranks.main else ({}, [], {})


def eval_reward(cfg: PipelineConfig, family: ModelFamily, device: torch.device) -> Reward | None:
    """The reward `eval/reward` reports: `eval.rewards`, else the one training maximised (`train.method.rewards`), so
    the figure a registry gate reads is the training signal measured on data training never saw. None without terms,
    and for a transcribing family, whose transcripts WER/CER already score. Built once per eval: a `clip_score` term
    loads its CLIP once for every batch and rank."""
    terms = cfg.eval.rewards if cfg.eval.rewards is not None else cfg.train.method.rewards
    if not terms or not (family.can(Capability.GENERATION) or family.can(Capability.ANSWERS)):
        return None
    return build_reward(terms, cfg.eval.clip, device)


@record
def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a distributed eval (launched by the eval stage)")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--final-dir", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_eval(load_config(args.config), args.final_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from flowspeed.engines.common.lifetime import run_rank

    run_rank(main)
