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
from datasets_prep.io import write_jsonl
from datasets_prep.prep import load_samples
from datasets_prep.sequence_prep import sample_of
from engines.models.sequence import SequenceFamily
from engines.torch_engine.data import CachedLatents, split_records

MAX_RESPONSES = 8  # held-out samples answered per eval: enough to read, cheap on a CPU


@torch.no_grad()
def held_out_loss(cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, device: torch.device) -> tuple:
    """Mean answer-token loss over the held-out samples: deterministic (no noise in a LM loss)."""
    _, val = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
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


def answer_held_out(cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, val: list[dict], device) -> list:  # noqa: ANN001
    """Prompt with each held-out conversation up to its last answer (or the audio), compare answers."""
    picked = val[:MAX_RESPONSES]
    samples = [sample_of(r, family, cfg) for r in picked]
    refs = [s.text if family.kind == "speech" else s.messages[-1]["content"] for s in samples]
    answers = family.respond(final_dir, samples, max_new_tokens=cfg.model.max_text_length // 4 or 16, device=device)
    rows = []
    for r, s, ref, ans in zip(picked, samples, refs, answers, strict=True):
        prompt = "" if family.kind == "speech" else next(m["content"] for m in s.messages if m["role"] == "user")
        rows.append({"source": r["source"], "prompt": prompt, "reference": ref, "response": ans,
                     "exact_match": ans.strip() == ref.strip()})  # fmt: skip
    return rows


def run_sequence_eval(cfg: PipelineConfig, family: SequenceFamily, final_dir: Path, device: torch.device) -> dict:
    loss, n_val, val = held_out_loss(cfg, family, final_dir, device)
    rows = answer_held_out(cfg, family, final_dir, val, device) if val else []
    out = cfg.eval_dir / "samples"
    write_jsonl(out / "responses.jsonl", rows)
    metrics = {"eval/val_loss": loss, "eval/val_samples": float(n_val)}
    if rows:
        metrics["eval/exact_match"] = sum(r["exact_match"] for r in rows) / len(rows)
    if rows and family.kind == "speech":  # published ASR numbers: WER/CER after Whisper's normaliser
        from evaluation.speech_metrics import score_transcripts

        scored = score_transcripts([r["reference"] for r in rows], [r["response"] for r in rows])
        metrics |= {"eval/wer": scored["wer"], "eval/cer": scored["cer"]}
        for r, s in zip(rows, scored["rows"], strict=True):
            r |= {"wer": s["wer"], "cer": s["cer"]}
        write_jsonl(out / "responses.jsonl", rows)
    paths = [str(out / "responses.jsonl")]
    if cfg.eval.benchmarks and family.kind != "speech":
        from evaluation.benchmark_eval import run_benchmark

        for bench in cfg.eval.benchmarks:
            scores, path = run_benchmark(cfg, bench, family, final_dir, device)
            metrics |= scores
            paths.append(str(path))
    return {"metrics": metrics, "paths": paths}
