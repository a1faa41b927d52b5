"""Which way is better, per eval metric: what a registry gate needs to compare a run to the champion.

Keyed by the metric's last name component (`eval/ai2d/accuracy` -> `accuracy`), so every benchmark's
accuracy shares one entry. A gate may still state `direction` itself; for a metric not listed here
it must.
"""

from __future__ import annotations

DIRECTIONS: dict[str, str] = {
    # losses and error rates
    "val_loss": "lower",
    "final_loss": "lower",
    "wer": "lower",
    "cer": "lower",
    "fid": "lower",
    "fvd": "lower",
    # agreement with references or prompts
    "clip_score": "higher",
    "exact_match": "higher",
    "accuracy": "higher",
    "relaxed_accuracy": "higher",
    "anls": "higher",
    # preference / reward post-training: the configured reward of held-out answers or samples
    "reward": "higher",
    # VBench-style video quality dimensions
    "temporal_flickering": "higher",
    "motion_smoothness": "higher",
    "subject_consistency": "higher",
    "background_consistency": "higher",
    # what eval.cache costs and gains against the same samples made without it
    "cache_psnr": "higher",
    "cache_max_abs_diff": "lower",
    "cache_speedup": "higher",
}


def direction_of(metric: str) -> str | None:
    """ "lower" / "higher" for a known metric (any prefix, e.g. `eval/`), else None."""
    return DIRECTIONS.get(metric.rsplit("/", 1)[-1])
