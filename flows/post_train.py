"""Post-training as one flow: prep of preference or prompt data -> post-training from the registry's champion (DPO,
Diffusion-DPO, GRPO, Flow-GRPO) -> eval -> registry, where the new version becomes champion only if its gates pass.

flowspeed post-train configs/pipelines/qwen2_vl-post-train.yaml   # after an SFT run registered a champion
# or, deployed: prefect deploy --all (see prefect.yaml), then run `post-train/flowspeed-post-train`

The work is the `pipeline` flow's, run in this flow run (the same stage flows, caching and MLflow runs); what this
flow adds is the refusal, before anything runs, of a config that is not a post-training one: a post-training run
that trained by SFT, started from the configured weights, or registered without a gate would promote a model no one
showed to be better than the one it was meant to improve. A gate on a metric the champion was never measured on
(`eval/reward` of an SFT champion) is measured on the champion first (tasks/registry.py `measure_champion`).
"""

from __future__ import annotations

from typing import Any

from flowspeed.configs import PipelineConfig
from flowspeed.flows.pipeline import pipeline
from prefect import flow

#: the `train.method.name`s that post-train a model (engines/methods/); sft trains it in the first place
POST_TRAINING_METHODS = ("dpo", "diffusion_dpo", "grpo", "flow_grpo")


def post_train_problems(cfg: PipelineConfig) -> list[str]:
    """Why `cfg` is not a post-training config, one fix per line; [] when it is."""
    out = []
    method = cfg.train.method
    if method.name not in POST_TRAINING_METHODS:
        out.append(f"train.method.name={method.name}: post-training runs {', '.join(POST_TRAINING_METHODS)}; for "
                   "supervised finetuning use the `pipeline` flow (flowspeed run)")  # fmt: skip
    if cfg.train.init_from != "champion":
        out.append(f"train.init_from={cfg.train.init_from}: post-training improves the registry's champion; set "
                   "train.init_from: champion")  # fmt: skip
    reg = cfg.tracking.registry
    if not reg.enabled:
        out.append("tracking.registry.enabled=false: the new version is promoted only through the registry's gates; "
                   "set tracking.registry.enabled: true")  # fmt: skip
    elif not reg.gates:
        out.append("tracking.registry.gates is empty: every post-trained version would become champion; add one, e.g. "
                   "[{metric: eval/reward, min_improvement: 0.02}]")  # fmt: skip
    rewards = cfg.eval.rewards if cfg.eval.rewards is not None else method.rewards
    if reg.enabled and not rewards and any(g.metric == "eval/reward" for g in reg.gates):
        out.append("tracking.registry.gates reads eval/reward, but no reward is configured, so the gate can never "
                   "pass: set eval.rewards (e.g. [{name: exact_answer}]) or train.method.rewards")  # fmt: skip
    return out


@flow(name="post-train", log_prints=True)
def post_train(cfg: PipelineConfig) -> dict[str, Any]:
    problems = post_train_problems(cfg)
    if problems:
        raise ValueError("not a post-training config:\n- " + "\n- ".join(problems))
    return pipeline.fn(cfg)  # the pipeline's body, in this flow run: prep -> train from champion -> eval -> registry
