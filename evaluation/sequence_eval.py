"""Eval for the families that answer (VLMs) or transcribe (Whisper): their answers to the held-out samples,
WER/CER for transcripts, and the benchmark suites `eval.benchmarks` lists for answering families.

Outputs under `cfg.eval_dir`: samples/responses.jsonl (one row per held-out sample: the prompt,
the reference answer, the model's answer). The benchmark suites (MMMU/AI2D/DocVQA, WER) build on
`respond`; this stage measures what every run has: its own held-out data. The held-out loss comes
before it, from evaluation/common.py, as for every family.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.sequence_prep import sample_of
from flowspeed.engines.common.io import write_jsonl
from flowspeed.engines.models.registry import Capability, ModelFamily
from flowspeed.evaluation.common import max_new_tokens
from flowspeed.evaluation.rewards import Reward, reward_prompt
from flowspeed.evaluation.sharded import Ranks, run_sharded, task_folder


def answer_held_out(
    cfg: PipelineConfig,
    family: ModelFamily,
    final_dir: Path,
    val: list[dict],
    device: torch.device,
    ranks: Ranks,
    reward: Reward | None = None,
) -> list[dict]:
    """Prompt with each held-out conversation up to its last answer (or the audio), compare answers. With `reward`,
    each row also gets its answer's reward, scored where the answer is made (a resumed eval keeps it with the row)."""
    picked = val[: cfg.eval.max_answers]
    transcribes = family.can(Capability.TRANSCRIPTION)  # the reference is the transcript; there is no prompt

    def work(batch: list[int]) -> list[dict]:
        samples = [sample_of(picked[i], family, cfg) for i in batch]
        refs = [s.text if transcribes else s.messages[-1]["content"] for s in samples]
        answers = family.respond(final_dir, samples, max_new_tokens=max_new_tokens(cfg), device=device)
        # a transcript has no prompt: the audio is the input
        prompts = ["" if transcribes else next(m["content"] for m in s.messages if m["role"] == "user")
                   for s in samples]  # fmt: skip
        # the reward reads the question the reference answers, as GRPO's rollouts do
        rewarded = [reward_prompt(s.messages) for s in samples]
        rewards = reward.text(answers, refs, rewarded).tolist() if reward is not None else None
        rows = []
        for k, (i, prompt, ref, ans) in enumerate(zip(batch, prompts, refs, answers, strict=True)):
            rows.append({"source": picked[i]["source"], "prompt": prompt, "reference": ref, "response": ans,
                         "exact_match": ans.strip() == ref.strip()})  # fmt: skip
            if rewards is not None:
                rows[-1]["reward"] = rewards[k]
        return rows

    settings = {"sources": [r["source"] for r in picked], "max_new_tokens": max_new_tokens(cfg),
                "shape": [cfg.data.height, cfg.data.width, cfg.data.num_frames]}  # fmt: skip
    if reward is not None:  # only then: an eval without rewards keeps the folder (and the rows) it had before them
        settings["rewards"] = [[t.name, t.weight] for t in reward.terms]
    folder = task_folder(cfg.eval_dir, "responses", family.export_files(final_dir), settings)
    rows = run_sharded(folder, len(picked), work, ranks, cfg.eval.batch_size, "answers")
    return [{k: v for k, v in r.items() if k != "index"} for r in rows]


def run_sequence_eval(
    cfg: PipelineConfig,
    family: ModelFamily,
    final_dir: Path,
    val: list[dict],
    device: torch.device,
    ranks: Ranks | None = None,
    reward: Reward | None = None,
) -> dict:
    """{"metrics", "paths", "info"} of the answers to `val` (the held-out records rank 0 read; other ranks pass
    [] and get them broadcast) and of the benchmarks; empty on ranks other than 0. With `reward`: `eval/reward`, the
    mean of the held-out answers' rewards (each row keeps its own)."""
    ranks = ranks or Ranks()
    if ranks.world > 1:  # every rank answers its share of the held-out set rank 0 read
        box = [val]
        dist.broadcast_object_list(box, src=0)
        val = box[0]
    rows = answer_held_out(cfg, family, final_dir, val, device, ranks, reward) if val else []
    scored = []
    if cfg.eval.benchmarks and family.can(Capability.ANSWERS):
        # pandas and PIL: imported only when a benchmark runs, not with the stage machinery
        from flowspeed.evaluation.benchmark_eval import run_benchmark

        scored = [run_benchmark(cfg, bench, family, final_dir, device, ranks) for bench in cfg.eval.benchmarks]
    if not ranks.main:
        return {"metrics": {}, "paths": []}
    out = cfg.eval_dir / "samples"
    metrics: dict[str, float] = {}
    if rows:
        metrics["eval/exact_match"] = sum(r["exact_match"] for r in rows) / len(rows)
    if rows and reward is not None:
        metrics["eval/reward"] = sum(r["reward"] for r in rows) / len(rows)
    if rows and family.can(Capability.TRANSCRIPTION):  # published ASR numbers: WER/CER after Whisper's normaliser
        # transformers' Whisper normaliser and jiwer: imported only when transcripts are scored
        from flowspeed.evaluation.speech_metrics import score_transcripts

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
