"""Eval for the token-loss families: held-out loss, and answers (or transcripts) from the export.

Outputs under `cfg.eval_dir`: samples/responses.jsonl (one row per held-out sample: the prompt,
the reference answer, the model's answer), metrics.json, config.yaml. The benchmark suites
(MMMU/AI2D/DocVQA, WER) build on `respond`; this stage measures what every run has: its own
held-out data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs import ComponentConfig, PipelineConfig
from datasets_prep.cache import CachedLatents
from datasets_prep.sequence_prep import sample_of
from engines.common.io import write_jsonl
from engines.models.sequence import SequenceFamily
from evaluation.sharded import Ranks, run_sharded, task_folder


@torch.no_grad()
def held_out_loss(cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, device: torch.device) -> tuple:
    """Mean answer-token loss over the held-out samples: deterministic (no noise in a LM loss)."""
    from evaluation.run import held_out_records

    val = held_out_records(cfg)
    if not val:
        return float("nan"), 0, []
    # The export keeps an opted-in checkpoint's own modeling code: the opt-in carries over to it.
    export = ComponentConfig(
        pretrained=str(final_dir), preset=None, trust_remote_code=cfg.model.transformer.trust_remote_code
    )
    model_cfg = cfg.model.model_copy(update={"transformer": export})
    model = family.load_model(model_cfg).to(device).eval()
    data = CachedLatents(cfg.cache_dir, val)
    losses = [family.training_loss(model, None, {k: v.to(device) for k, v in family.collate([data[i]]).items()}, None)
              for i in range(len(data))]  # fmt: skip
    return float(torch.stack(losses).mean()), len(val), val


def max_new_tokens(cfg: PipelineConfig) -> int:
    return cfg.eval.max_new_tokens or cfg.model.max_text_length // 4 or 16


def answer_held_out(
    cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, val: list[dict], device: torch.device, ranks: Ranks
) -> list[dict]:
    """Prompt with each held-out conversation up to its last answer (or the audio), compare answers."""
    picked = val[: cfg.eval.max_answers]

    def work(batch: list[int]) -> list[dict]:
        samples = [sample_of(picked[i], family, cfg) for i in batch]
        refs = [s.text if family.kind == "speech" else s.messages[-1]["content"] for s in samples]
        answers = family.respond(final_dir, samples, max_new_tokens=max_new_tokens(cfg), device=device)
        rows = []
        for i, s, ref, ans in zip(batch, samples, refs, answers, strict=True):
            prompt = "" if family.kind == "speech" else next(m["content"] for m in s.messages if m["role"] == "user")
            rows.append({"source": picked[i]["source"], "prompt": prompt, "reference": ref, "response": ans,
                         "exact_match": ans.strip() == ref.strip()})  # fmt: skip
        return rows

    settings = {"sources": [r["source"] for r in picked], "max_new_tokens": max_new_tokens(cfg),
                "shape": [cfg.data.height, cfg.data.width, cfg.data.num_frames]}  # fmt: skip
    folder = task_folder(cfg.eval_dir, "responses", family.export_files(final_dir), settings)
    rows = run_sharded(folder, len(picked), work, ranks, cfg.eval.batch_size, "answers")
    return [{k: v for k, v in r.items() if k != "index"} for r in rows]


def run_sequence_eval(
    cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, device: torch.device, ranks: Ranks | None = None
) -> dict:
    ranks = ranks or Ranks()
    loss, n_val, val = held_out_loss(cfg, family, final_dir, device) if ranks.main else (float("nan"), 0, [])
    if ranks.world > 1:  # every rank answers its share of the held-out set rank 0 read
        import torch.distributed as dist

        box = [val]
        dist.broadcast_object_list(box, src=0)
        val = box[0]
    rows = answer_held_out(cfg, family, final_dir, val, device, ranks) if val else []
    scored = []
    if cfg.eval.benchmarks and family.kind != "speech":
        from evaluation.benchmark_eval import run_benchmark

        scored = [run_benchmark(cfg, bench, family, final_dir, device, ranks) for bench in cfg.eval.benchmarks]
    if not ranks.main:
        return {"metrics": {}, "paths": []}
    out = cfg.eval_dir / "samples"
    metrics = {"eval/val_loss": loss, "eval/val_samples": float(n_val)} if n_val or not cfg.eval.model else {}
    if rows:
        metrics["eval/exact_match"] = sum(r["exact_match"] for r in rows) / len(rows)
    if rows and family.kind == "speech":  # published ASR numbers: WER/CER after Whisper's normaliser
        from evaluation.speech_metrics import score_transcripts

        scores = score_transcripts([r["reference"] for r in rows], [r["response"] for r in rows])
        metrics |= {"eval/wer": scores["wer"], "eval/cer": scores["cer"]}
        for r, s in zip(rows, scores["rows"], strict=True):
            r |= {"wer": s["wer"], "cer": s["cer"]}
    write_jsonl(out / "responses.jsonl", rows)
    paths = [str(out / "responses.jsonl")]
    info: dict[str, str] = {}  # the run's tags: where a benchmark score differs from VLMEvalKit's, and how
    for scores, path, tags in scored:
        metrics |= scores
        info |= tags
        paths.append(str(path))
    return {"metrics": metrics, "paths": paths, "info": info}
