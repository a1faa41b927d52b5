"""The three stage tasks. Each returns a small dict of paths and counts, never tensors.

Retries cover transient failures (a busy filesystem, a rank lost to a flaky interconnect); they are
safe because every stage resumes: prep skips cached samples, training resumes from its latest
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.configs.catalog import FamilyFacts, family_facts
from flowspeed.datasets_prep.manifest import Entry, read_sources
from flowspeed.engines.common.io import file_digest
from flowspeed.tasks.caching import files_policy, retry_if_transient
from prefect import task

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _export_facts(cfg: PipelineConfig) -> FamilyFacts:
    """What makes the family's export whole, from the catalog: a cache check (every no-op rerun makes two) then
    imports no model library; a family the catalog does not list yet is asked of the real registry."""
    facts = family_facts(cfg.model.family)
    if facts is None:
        raise ValueError(f"unknown model family {cfg.model.family!r}")
    return facts


def _denoiser_weights(cfg: PipelineConfig) -> Path:
    """The weights an eval of `cfg` reads (its cache key's source): `flowspeed.evaluation.exports.trained_export`, which
    imports no model library for the plain `<train_dir>/final`."""
    from flowspeed.evaluation.exports import trained_export

    export = trained_export(cfg)
    return export / _export_facts(cfg).denoiser_subfolder / WEIGHTS


def _cfg(inputs: dict[str, Any]) -> PipelineConfig:
    return inputs["cfg"]


def _prep_sources(inputs: dict[str, Any]) -> list[Path]:
    d = _cfg(inputs).data
    manifest = Path(d.manifest)
    if not manifest.exists():
        return [manifest]
    items = read_sources(manifest, d.manifest_format, d.roots, d.incoming)
    media = [p for e in items if isinstance(e, Entry) for p in e.media]  # new incoming files change the key
    return ([manifest] if manifest.is_file() else []) + media


def _prep_outputs(inputs: dict[str, Any]) -> list[Path]:
    cfg = _cfg(inputs)
    return [cfg.prep_dir / "samples.jsonl", cfg.cache_dir / "index.jsonl", cfg.prep_dir / "summary.json"]


def _part_path(cfg: PipelineConfig, index: int) -> Path:
    from flowspeed.datasets_prep.prep import part_path

    return part_path(cfg, index)


def _prep_current(inputs: dict[str, Any], result: dict[str, Any]) -> bool:
    """samples.jsonl is still the one this cached result wrote (another manifest's prep rewrites it)."""
    return result.get("samples_digest") == file_digest(_cfg(inputs).prep_dir / "samples.jsonl")


def _train_outputs(inputs: dict[str, Any]) -> list[Path]:
    cfg = _cfg(inputs)
    return [*_export_facts(cfg).export_files(cfg.train_dir / "final"), cfg.train_dir / "losses.json"]


def _eval_outputs(inputs: dict[str, Any]) -> list[Path]:
    """metrics.json lists the samples it wrote: all of them must still be there to reuse a result."""
    metrics = _cfg(inputs).eval_dir / "metrics.json"
    if not metrics.is_file():
        return [metrics]
    return [metrics, *(Path(p) for p in json.loads(metrics.read_text()).get("videos", []))]


@task(
    name="prep-latents",
    retries=1,
    retry_condition_fn=retry_if_transient,
    retry_delay_seconds=5,
    persist_result=True,
    cache_policy=files_policy(sources=_prep_sources, outputs=_prep_outputs, current=_prep_current),
)
def prep_latents(cfg: PipelineConfig) -> dict[str, Any]:
    """Probe, decode and encode the manifest into the latent cache (skips what is cached)."""
    from flowspeed.datasets_prep.prep import launch_prep

    return launch_prep(cfg).as_dict()


@task(
    name="prep-slice",
    retries=1,
    retry_condition_fn=retry_if_transient,
    retry_delay_seconds=5,
    persist_result=True,
    cache_policy=files_policy(sources=_prep_sources, outputs=lambda i: [_part_path(i["cfg"], i["index"])]),
)
def prep_slice_task(cfg: PipelineConfig, index: int, count: int) -> dict[str, Any]:
    """One slice of the manifest (records i with i % count == index), on whatever worker runs it."""
    from flowspeed.datasets_prep.prep import prep_slice

    return prep_slice(cfg, index, count)


@task(name="merge-prep-slices", retries=1, retry_condition_fn=retry_if_transient)
def merge_prep_task(cfg: PipelineConfig, count: int) -> dict[str, Any]:
    from flowspeed.datasets_prep.prep import merge_slices

    return merge_slices(cfg, count).as_dict()


def make_task_runner(cfg: PipelineConfig) -> Any:
    """The Prefect task runner `data.task_runner` names; cluster runners are optional installs."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    d = cfg.data
    if d.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=d.slices)
    if d.task_runner == "process":
        from flowspeed.engines.common.lifetime import (
            exit_with_parent,  # workers would wait on their queue forever after a kill
        )

        return ProcessPoolTaskRunner(max_workers=d.slices, initializer=exit_with_parent)
    try:
        if d.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            if d.cluster_address:
                return DaskTaskRunner(address=d.cluster_address)
            return DaskTaskRunner(cluster_kwargs={"n_workers": d.slices, "threads_per_worker": 1, "processes": True})
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=d.cluster_address) if d.cluster_address else RayTaskRunner()
    except ImportError as exc:
        extra = "dask" if d.task_runner == "dask" else "ray"
        raise ValueError(
            f"data.task_runner={d.task_runner} needs prefect-{extra}: pip install 'flowspeed[{extra}]'"
        ) from exc


@task(
    name="train-model",
    retries=1,
    retry_condition_fn=retry_if_transient,
    retry_delay_seconds=5,
    persist_result=True,
    cache_policy=files_policy(
        sources=lambda i: [_cfg(i).prep_dir / "samples.jsonl"],
        outputs=_train_outputs,
        exclude=("run_id", "tracking_uri"),
    ),
)
def train_model(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """Train (in process, or torchrun for nproc_per_node > 1) while holding the node's GPU slots, or as a Slurm
    job (`train.launcher: slurm`: Slurm allocates the GPUs, so no slots here); a retry resumes from the last
    checkpoint."""
    if cfg.train.launcher == "slurm":
        from flowspeed.tasks.slurm import train_on_slurm

        return {**train_on_slurm(cfg, run_id, tracking_uri), "gpu_slots": None, "run_id": run_id}
    from flowspeed.engines.launch import launch
    from flowspeed.tasks.gpu_slots import gpu_slots  # torch: only when training runs

    with gpu_slots(cfg) as slots:
        out = launch(cfg, run_id, tracking_uri).as_dict()
    out["gpu_slots"] = slots
    out["run_id"] = run_id
    return out


@task(
    name="evaluate-model",
    retries=1,
    retry_condition_fn=retry_if_transient,
    retry_delay_seconds=5,
    persist_result=True,
    cache_policy=files_policy(sources=lambda i: [_denoiser_weights(_cfg(i))], outputs=_eval_outputs),
)
def evaluate_model(cfg: PipelineConfig) -> dict[str, Any]:
    from flowspeed.evaluation.run import run_eval

    return run_eval(cfg).as_dict()
