"""Evaluation: held-out loss, generated samples and their metrics, answers, transcripts and benchmark scores of a
trained export. No Prefect here; the eval stage (tasks/stages.py) calls `flowspeed.evaluation.run.run_eval`.

The modules form layers, each importing only from the layers below it (tests/evaluation/test_import_graph.py
fails on a circle). Metric definitions, which import no other evaluation module but `directions` (which way is
better for each metric): `generation_metrics` (FID/FVD/VBench-style scores), `clip_score`, `speech_metrics`
(WER/CER) and `benchmarks` (VLM benchmark files, prompts, scorers). Shared machinery: `sharded` (items split
across ranks, resumable per-item rows) and `common` (the held-out split, the trained model, the one held-out
loss loop every family goes through, the answer length) and `exports` (which export an eval reads, path logic
without torch, so the pipeline's cache check asks the same function). Tasks, one per capability a family declares:
`generation_eval` (GENERATION: samples and media metrics), `sequence_eval` (ANSWERS/TRANSCRIPTION: held-out
answers, WER/CER) and `benchmark_eval` (ANSWERS: benchmark suites, called by `sequence_eval`). On top, `run`:
the stage itself, which asks the family what it can do and runs the matching tasks, in one process or as a
torchrun job.
"""
