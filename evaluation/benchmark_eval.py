"""Scoring an understanding model on the benchmarks `eval.benchmarks` lists (VLMEvalKit TSV files).

Each item becomes a one-turn conversation (the family's prompt template, its image(s) resized to
the training size `data.height` x `data.width`, as prep hands images to the model) answered with
the family's own `respond`. Scores follow each benchmark's definition (evaluation/benchmarks.py).
Outputs: metrics `eval/<bench>/<metric>`, `eval/<bench>/<split>/<metric>` and
`eval/<bench>/category/<name>`, tags saying where the score deliberately differs from VLMEvalKit's
(`flowspeed.eval.<bench>.*`), and one row per item in `samples/benchmark_<bench>.jsonl` (what the
MLflow table shows), so every number can be recomputed from the logged rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.configs.schema import BenchmarkConfig
from flowspeed.engines.common.io import write_jsonl
from flowspeed.engines.models.registry import ModelFamily
from flowspeed.engines.models.sequence import SequenceSample
from flowspeed.evaluation.benchmarks import (
    PROMPT_TEMPLATES,
    BenchmarkItem,
    build_prompt,
    get_spec,
    load_benchmark,
    score_benchmark,
)
from flowspeed.evaluation.common import max_new_tokens
from flowspeed.evaluation.sharded import Ranks, run_sharded, task_folder


def _sample(item: BenchmarkItem, prompt: str, cfg: PipelineConfig) -> SequenceSample:
    size = (cfg.data.width, cfg.data.height)
    images = [np.asarray(im.convert("RGB").resize(size)) for im in item.pil_images()]
    return SequenceSample(messages=[{"role": "user", "content": prompt}], images=images)


def _metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces only."""
    return re.sub(r"[^\w\-. /]", "_", text)


def run_benchmark(
    cfg: PipelineConfig,
    bench: BenchmarkConfig,
    family: ModelFamily,
    final_dir: Path,
    device: torch.device,
    ranks: Ranks | None = None,
) -> tuple[dict[str, float], Path, dict[str, str]]:
    """Items answered in batches across the ranks (resumable), scored on rank 0: (metrics, rows path, tags);
    ({}, path, {}) elsewhere."""
    ranks = ranks or Ranks()
    spec = get_spec(bench.name)
    items = load_benchmark(bench.name, bench.tsv)[: bench.limit]
    template = bench.template or (cfg.model.family if cfg.model.family in PROMPT_TEMPLATES else "default")
    prompts = [build_prompt(item, spec, template) for item in items]

    def work(batch: list[int]) -> list[dict[str, Any]]:
        samples = [_sample(items[i], prompts[i], cfg) for i in batch]
        answers = family.respond(final_dir, samples, max_new_tokens=max_new_tokens(cfg), device=device)
        return [{"answer": a} for a in answers]

    tsv = Path(bench.tsv)
    settings = {"tsv": f"{tsv.resolve()}:{tsv.stat().st_size}:{tsv.stat().st_mtime_ns}", "limit": bench.limit,
                "template": template, "size": [cfg.data.height, cfg.data.width],
                "max_new_tokens": max_new_tokens(cfg)}  # fmt: skip
    folder = task_folder(cfg.eval_dir, f"benchmark-{spec.name}", family.export_files(final_dir), settings)
    answered = run_sharded(folder, len(items), work, ranks, cfg.eval.batch_size, f"{spec.name} items")
    path = cfg.eval_dir / "samples" / f"benchmark_{spec.name}.jsonl"
    if not ranks.main:
        return {}, path, {}
    score = score_benchmark(spec.name, items, [r["answer"] for r in answered])
    metrics = {f"eval/{k}": v for k, v in score.metrics().items()}
    for category, (value, _) in score.per_category.items():
        metrics[_metric_key(f"eval/{spec.name}/category/{category}")] = value
    rows: list[dict[str, Any]] = [{**row, "prompt": prompt} for row, prompt in zip(score.rows, prompts, strict=True)]
    write_jsonl(path, rows)
    return metrics, path, score.tags
