"""Flow-GRPO (engines/methods/flow_grpo.py): the SDE step against the published formula and an independent Gaussian
density, the first update on-policy with the reference untouched (SD3 and Flux), and the real engine raising a
synthetic reward (image brightness, and its opposite) on the tiny SD3 over 20 steps."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.methods import MethodContext, get_method, group_advantages
from flowspeed.engines.methods.flow_grpo import log_prob, noise_scales, sde_transition
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine.trainer import train
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from mlflow import MlflowClient
from torch.distributions import Normal

from tests.conftest import REPO

RECIPE = REPO / "configs" / "pipelines" / "sd3-flow-grpo.yaml"
METRICS = ["train/clip_fraction", "train/kl", "train/reward_mean", "train/reward_std"]


def darkness(frames: np.ndarray, prompts: list[str]) -> list[float]:
    """1 - brightness: the control whose optimum is the opposite image (a `module:function` reward)."""
    x = np.asarray(frames, dtype=np.float32) / 255.0
    return (1.0 - x.reshape(x.shape[0], -1).mean(1)).tolist()


# ---- the SDE step ---------------------------------------------------------------------------------------------------
def test_sde_step_is_the_published_one_and_its_log_prob_the_gaussian_density() -> None:
    a, sigmas = 0.7, torch.tensor([1.0, 0.9, 0.6, 0.4, 0.0], dtype=torch.float64)
    scales = noise_scales(sigmas, a).tolist()
    assert scales[0] == pytest.approx(a * math.sqrt(1.0 / (1 - 0.9)))  # sigma = 1: the next sigma in the denominator
    assert scales[2] == pytest.approx(a * math.sqrt(0.6 / 0.4))
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for j in (0, 2):  # sigma 1 -> 0.9 and 0.6 -> 0.4
        sigma, nxt, s = sigmas[j].item(), sigmas[j + 1].item(), scales[j]
        mean, std = sde_transition(x, v, sigma, nxt, s)
        dt = nxt - sigma
        # the paper's eq. 9 as written: x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt, noise s sqrt(|dt|) eps.
        # float32 rounding of O(10) terms over a handful of operations stays far below 1e-5.
        torch.testing.assert_close(mean, x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, rtol=0, atol=1e-5)
        assert std == pytest.approx(s * math.sqrt(-dt))
        x_next = mean + std * torch.randn(mean.shape, generator=g)
        density = Normal(mean.double(), std).log_prob(x_next.double()).flatten(1).mean(1)  # per element, as theirs
        torch.testing.assert_close(log_prob(x_next, mean, std).double(), density, rtol=0, atol=1e-5)
    # without noise the step is the Euler step of diffusers' flow-matching scheduler
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=[1.0, 0.9, 0.6, 0.4])
    expected = euler.step(v, euler.timesteps[2], x).prev_sample
    torch.testing.assert_close(sde_transition(x, v, 0.6, 0.4, 0.0)[0], expected, rtol=0, atol=1e-6)


def test_group_advantages_normalise_within_each_prompt_group() -> None:
    adv, std = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]), 4, unbiased=False)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(adv[:4], (r - 2.5) / (r.std(unbiased=False) + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with one reward has no signal
    assert std[1] == 0 and std[0] == pytest.approx(r.std(unbiased=False).item())


# ---- the family's side: its denoiser call and sampling grid, against its own diffusers pipeline ---------------------
@pytest.mark.parametrize(("family", "preset"), [("sd3", "tiny"), ("flux", "tiny"), ("flux", "tiny-dev")])
def test_without_noise_the_sampler_is_the_family_pipeline(family: str, preset: str, tmp_path: Path) -> None:
    """noise_level -> 0 leaves the Euler ODE step, so `flow_velocity` on `sampling_sigmas` must give the pipeline's
    own latents (guidance 1 for SD3; Flux-dev's dynamic shift and embedded guidance 3.5): the timestep convention,
    Flux's packing and the sigma grid checked against diffusers, not against this module."""
    cfg = _config(family, tmp_path, f"model.transformer.preset={preset}")
    fam = get_family(family)
    model = fam.load_transformer(cfg.model, 64, 4).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77 + 64 if family == "sd3" else 64, 64, generator=g)
    pooled = torch.randn(2, 64 if family == "sd3" else 32, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    parts = {name: None for enc, tok, _ in fam.text_parts for name in (enc, tok)}
    pipe = fam.pipeline_cls(transformer=model, scheduler=fam.load_scheduler(cfg.model), vae=fam.load_vae(cfg.model),
                            **parts)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    packed = x if family == "sd3" else FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    extra = {"guidance_scale": 1.0} if family == "sd3" else {}
    sigmas = fam.sampling_sigmas(fam.load_scheduler(cfg.model), 4, (4, 8, 8)).tolist()
    with torch.no_grad():
        out = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, latents=packed, num_inference_steps=4, height=64,
                   width=64, output_type="latent", **extra).images  # fmt: skip
        if family == "flux":
            out = FluxPipeline._unpack_latents(out, 64, 64, 8)
        for j in range(4):
            v = fam.flow_velocity(model, x, torch.full((2,), sigmas[j]), {"text_embeds": text, "pooled_embeds": pooled})
            x = sde_transition(x, v, sigmas[j], sigmas[j + 1], 0.0)[0]
    torch.testing.assert_close(x, out, rtol=0, atol=1e-5)  # float32 rounding of O(5) latents over 4 Euler steps


# ---- one update, by hand --------------------------------------------------------------------------------------------
def _config(family: str, tmp_path: Path, *overrides: str) -> PipelineConfig:
    base = RECIPE if family == "sd3" else REPO / "configs" / "flux-quickstart.yaml"
    method = ["train.method.name=flow_grpo", "train.method.rewards=[{name: brightness}]"] if family == "flux" else []
    return load_config(base, ["data.manifest=unused.jsonl", *method, *overrides], workdir=tmp_path)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_first_update_is_on_policy_and_the_reference_stays_the_starting_model(family: str, tmp_path: Path) -> None:
    cfg = _config(family, tmp_path, "train.method.sampling_steps=4")
    fam = get_family(family)
    model = fam.load_transformer(cfg.model, 64, 4)
    ctx = MethodContext(
        cfg=cfg, family=fam, model=model, scheduler=fam.load_scheduler(cfg.model), device=torch.device("cpu"),
        rank=0, world=1, dp_rank=0, dp_world=1, dp_group=None,
        build_frozen=lambda: fam.load_transformer(cfg.model, 64, 4).requires_grad_(False),  # as build_model(frozen)
    )  # fmt: skip
    method = get_method("flow_grpo")
    method.check(fam, cfg)
    method.setup(ctx)
    ref = ctx.state["flow_grpo"]["reference"].frozen
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    text = 77 + 64 if family == "sd3" else 64  # SD3 prepends CLIP's 77 tokens to T5's
    batch = {"text_embeds": torch.randn(2, text, 64, generator=g), "pooled_embeds": torch.randn(2, 64 if family ==
             "sd3" else 32, generator=g), "latent_params": torch.zeros(2, 8, 8, 8)}  # fmt: skip
    records = [{"latent_shape": [8, 8, 8], "caption": "a red circle"}, {"latent_shape": [8, 8, 8], "caption": "sky"}]

    loss, metrics = method.loss(ctx, batch, records, torch.Generator().manual_seed(1))
    assert sorted(metrics) == METRICS and all(m.ndim == 0 for m in metrics.values())
    # policy = reference = the rollouts' policy: the KL is 0 and no ratio is clipped (ratio 1: the same computation)
    assert metrics["train/kl"].item() == 0 and metrics["train/clip_fraction"].item() == 0
    assert metrics["train/reward_std"] > 0  # the groups differ: there is a signal
    again, same = method.loss(ctx, batch, records, torch.Generator().manual_seed(1))  # all noise from the generator
    assert torch.equal(again, loss) and all(torch.equal(same[k], metrics[k]) for k in METRICS)

    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    _, after = method.loss(ctx, batch, records, torch.Generator().manual_seed(1))
    assert after["train/kl"] > 0  # the policy moved away from the reference ...
    assert all(torch.equal(v, start[k]) for k, v in ref.state_dict().items())  # ... which did not move


def test_families_without_a_flow_sampler_are_refused(tmp_path: Path) -> None:
    cfg = _config("sd3", tmp_path)
    with pytest.raises(ValueError, match="model.family=cogvideox is not one"):
        get_method("flow_grpo").check(get_family("cogvideox"), cfg)


# ---- the engine ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_cache(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> PipelineConfig:
    cfg = load_config(RECIPE, [f"data.manifest={demo_manifest}"], workdir=tmp_path_factory.mktemp("sd3-flow-grpo"))
    run_prep(cfg)
    return cfg


def _reward_curve(tmp_path: Path, prepped: PipelineConfig, mlflow_db: Path, *overrides: str) -> list[float]:
    cfg = load_config(RECIPE, [f"data.manifest={prepped.data.manifest}", f"data.output_dir={prepped.prep_dir}",
                               f"data.cache_dir={prepped.cache_dir}", "train.max_steps=20", "train.checkpoint_every=20",
                               "train.val_fraction=0", "train.warmup_steps=0", "train.metrics_flush_every=1",
                               *overrides], workdir=tmp_path)  # fmt: skip
    shutil.copyfile(mlflow_db, tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri(cfg))
    run = client.create_run(ensure_experiment(client, cfg)).info.run_id
    train(cfg, run, tracking_uri(cfg))
    history = {k: sorted(client.get_metric_history(run, k), key=lambda m: m.step) for k in METRICS}
    assert all([m.step for m in h] == list(range(1, 21)) for h in history.values())
    return [m.value for m in history["train/reward_mean"]]


# lr 3e-2, 4 prompts x 4 samples, no KL: 20 steps move the reward mean by 0.05-0.15 on seeds 0-2 (either reward),
# while its step-to-step noise at the start is ~0.005 (a within-group std of ~0.005 over 16 samples)
@pytest.mark.parametrize(("reward", "seed"), [("brightness", 0), ("brightness", 1), (f"{__name__}:darkness", 0)])
def test_flow_grpo_raises_a_synthetic_reward_in_the_engine(
    reward: str, seed: int, tmp_path: Path, sd3_cache: PipelineConfig, mlflow_db: Path
) -> None:
    curve = _reward_curve(tmp_path, sd3_cache, mlflow_db, f"train.seed={seed}", "train.lr=3e-2", "train.batch_size=4",
                          f"train.method.rewards=[{{name: '{reward}'}}]", "train.method.kl_coef=0")  # fmt: skip
    assert statistics.mean(curve[-5:]) > statistics.mean(curve[:5]) + 0.025, curve
