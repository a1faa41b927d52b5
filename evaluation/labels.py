"""Which eval metrics came from a random-init scorer, read from the labels the eval stage records with its
metrics (`EvalResult.info`, the run's `flowspeed.eval.*` tags): such a number follows one model's progress in
one setup and is never comparable with a published score. A leaf module without torch: the eval flow, the CLI
summary and `flowspeed compare` ask it.
"""

from __future__ import annotations

RANDOM_INIT = "random-init"  # what a label says when its scorer had no weights (generation_metrics.RANDOM_INIT)
RANDOM_INIT_TAG = "flowspeed.eval.random_init_metrics"  # the metrics, comma-separated, on eval and pipeline runs

# label -> the metrics computed with the scorer it names
_SCORERS: dict[str, tuple[str, ...]] = {
    "clip_score_model": ("eval/clip_score", "eval/clip_cosine"),
    "background_consistency_encoder": ("eval/background_consistency",),
    "subject_consistency_encoder": ("eval/subject_consistency",),
    "fid_features": ("eval/fid",),
    "fvd_features": ("eval/fvd",),
}


def random_init_metrics(info: dict[str, str]) -> list[str]:
    """The metrics whose scorer was random-init, per the eval's labels."""
    return [m for label, metrics in _SCORERS.items() if RANDOM_INIT in str(info.get(label, "")) for m in metrics]


def random_init_tags(info: dict[str, str]) -> dict[str, str]:
    """`{RANDOM_INIT_TAG: "eval/clip_score,..."}`, or nothing when every scorer had weights."""
    found = random_init_metrics(info)
    return {RANDOM_INIT_TAG: ",".join(found)} if found else {}
