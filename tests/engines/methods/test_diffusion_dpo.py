"""Diffusion-DPO (engines/methods/diffusion_dpo.py): the authors' objective on cached latent pairs, through the real
engine on tiny SD3; the reference never trains; every family it serves gives per-sample losses."""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.configs.schema import ModelConfig
from flowspeed.datasets_prep.cache import CachedLatents, collate
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.loop import run_training
from flowspeed.engines.methods import get_method
from flowspeed.engines.methods.diffusion_dpo import dpo_objective, pair_losses, require_pairs, split_pair
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import per_sample_losses
from flowspeed.engines.torch_engine.trainer import TorchBackend
from torch import nn

from tests.conftest import REPO
from tests.engines.models.test_image_objectives import image_batch, seeded_denoiser

#: family -> (its Diffusion-DPO config, overrides): SD3's shipped recipe; Flux's quickstart with the same knobs
RECIPES = {
    "sd3": (REPO / "configs" / "pipelines" / "sd3-diffusion-dpo.yaml", []),
    "flux": (
        REPO / "configs" / "flux-quickstart.yaml",
        ["train.method.name=diffusion_dpo", "train.method.beta=100", "train.lr=1e-3", "train.warmup_steps=0"],
    ),
}
METRICS = ("train/chosen_reward", "train/rejected_reward", "train/margin", "train/accuracy")
STEPS = 8


class Watched(TorchBackend):
    """The torch engine's backend, keeping the weights it starts from (after the method's setup built the
    reference) so a test can compare the end of the run with them."""

    def load(self, path: Path | None) -> dict | None:
        state = super().load(path)
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        frozen = self.method_ctx.state["reference"].frozen
        self.ref_start = None if frozen is None else {n: p.detach().clone() for n, p in frozen.named_parameters()}
        return state


@pytest.fixture(scope="module")
def prepped_pairs(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> Callable[[str], PipelineConfig]:
    """family -> its config on the demo's image pairs (pairs.jsonl: the still its caption describes chosen, a wrong
    shape rejected), prepped once per family."""
    done: dict[str, PipelineConfig] = {}

    def get(family: str) -> PipelineConfig:
        if family not in done:
            path, overrides = RECIPES[family]
            manifest = demo_manifest.parent / "pairs.jsonl"
            done[family] = load_config(path, [f"data.manifest={manifest}", *overrides],
                                       workdir=tmp_path_factory.mktemp(family))  # fmt: skip
            run_prep(done[family])
        return done[family]

    return get


def _train(cfg: PipelineConfig, workdir: Path, mlflow_db: Path | None, *overrides: str) -> tuple[Watched, object]:
    path, recipe = RECIPES[cfg.model.family]
    cfg = load_config(path, [
        *recipe, f"data.manifest={cfg.data.manifest}", f"data.output_dir={cfg.prep_dir}",
        f"data.cache_dir={cfg.cache_dir}", f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}",
        "train.val_fraction=0", *overrides,
    ], workdir=workdir)  # fmt: skip
    uri = run_id = None
    if mlflow_db is not None:
        from mlflow import MlflowClient

        shutil.copyfile(mlflow_db, workdir / "mlflow.db")
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("dpo")).info.run_id
    backend = Watched(cfg)
    result = run_training(cfg, backend, run_id, uri)
    return backend, (result, uri, run_id)


def _pair_measure(cfg: PipelineConfig, policy: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """(mean of (l_w - l_l) - (r_w - r_l), the DPO loss) on every training pair, over 8 fixed noise draws."""
    fam = get_family(cfg.model.family)
    samples = read_jsonl(cfg.prep_dir / "samples.jsonl")
    chosen, rejected = split_pair(collate([CachedLatents(cfg.cache_dir, samples)[i] for i in range(len(samples))]))
    scheduler = fam.load_scheduler(cfg.model)
    diffs, losses = [], []
    with torch.no_grad():
        for seed in range(8):
            gen = torch.Generator().manual_seed(seed)
            l_w, l_l = pair_losses(fam, policy.eval(), scheduler, chosen, rejected, gen)
            r_w, r_l = pair_losses(fam, reference.eval(), scheduler, chosen, rejected, gen)
            diffs.append(((l_w - l_l) - (r_w - r_l)).mean().item())
            losses.append(dpo_objective(l_w, l_l, r_w, r_l, cfg.train.method.beta)[0].item())
    return statistics.mean(diffs), statistics.mean(losses)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_diffusion_dpo_prefers_the_chosen_images_and_never_trains_the_reference(
    family: str, prepped_pairs: Callable[[str], PipelineConfig], tmp_path: Path, mlflow_db: Path
) -> None:
    pairs_cfg = prepped_pairs(family)
    backend, (result, uri, run_id) = _train(pairs_cfg, tmp_path, mlflow_db)
    frozen = backend.method_ctx.state["reference"].frozen
    assert frozen is not None
    # the reference: the starting weights bit for bit, never in the optimizer, no gradient, not trainable
    assert backend.ref_start.keys() == backend.start.keys()
    for name, p in frozen.named_parameters():
        assert torch.equal(p, backend.ref_start[name]) and torch.equal(p, backend.start[name]), name
        assert p.grad is None and not p.requires_grad, name
    in_opt = {id(p) for g in backend.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in frozen.parameters()}
    moved = [n for n, p in backend.model.named_parameters() if not torch.equal(p, backend.start[n])]
    assert len(moved) > len(backend.start) // 2  # the policy did train

    # the policy now denoises the chosen images better than the reference does, relative to the rejected ones
    diff, loss = _pair_measure(pairs_cfg, backend.model, frozen)
    assert diff < 0, diff
    assert loss < math.log(2) - 0.05, loss  # log 2: the loss where policy = reference (inside = 0)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 1 starts at the reference exactly
    assert statistics.mean(result.losses[-3:]) < result.losses[0] - 0.05, result.losses

    # the four preference metrics, per step, under their shared names
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    hist = {k: sorted(client.get_metric_history(run_id, k), key=lambda m: m.step) for k in METRICS}
    for key in METRICS:
        assert [m.step for m in hist[key]] == list(range(1, STEPS + 1)), key
    for c, r, m, a in zip(*(hist[k] for k in METRICS), strict=True):
        assert m.value == pytest.approx(c.value - r.value, rel=1e-4, abs=1e-4) and 0 <= a.value <= 1
    assert hist["train/accuracy"][0].value == 0.0 and hist["train/margin"][0].value == 0.0  # policy = reference
    assert statistics.mean(m.value for m in hist["train/margin"][-3:]) > 0


def test_with_lora_the_reference_is_the_base_and_only_adapters_move(
    prepped_pairs: Callable[[str], PipelineConfig], tmp_path: Path
) -> None:
    pairs_cfg = prepped_pairs("sd3")
    backend, (result, _, _) = _train(pairs_cfg, tmp_path, None, "train.lora.enabled=true", "train.lr=3e-3")
    assert backend.method_ctx.state["reference"].frozen is None  # no second copy: the policy, adapters off
    trainable = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in backend.model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, backend.start[name]) and p.grad is None, name
    assert any(not torch.equal(p, backend.start[n]) for n, p in backend.model.named_parameters() if "lora_B" in n)
    assert all(p.requires_grad for n, p in backend.model.named_parameters() if "lora_" in n)  # switched back on
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert statistics.mean(result.losses[-3:]) < result.losses[0], result.losses


def test_two_ranks_equal_one_process(prepped_pairs: Callable[[str], PipelineConfig], tmp_path: Path) -> None:
    """FSDP2 and DDP on 2 gloo ranks (one pair each, both sides and the reference forward before one backward)
    give the losses of one process accumulating the two pairs; only reduction order differs, hence 1e-5."""
    from flowspeed.engines.launch import launch

    from tests.engines.torch_engine.runs_job import result, run_together

    cfg = prepped_pairs("sd3")
    common = [f"data.manifest={cfg.data.manifest}", f"data.output_dir={cfg.prep_dir}",
              f"data.cache_dir={cfg.cache_dir}", "train.max_steps=4", "train.checkpoint_every=100",
              "train.val_fraction=0", "train.batch_size=1"]  # fmt: skip
    # LoRA under FSDP2: the reference is the policy with its adapters off, switched without touching requires_grad
    # (peft's enable_adapters flipped it, and the last block, kept gathered, then lost its adapters' gradients)
    lora = ["train.lora.enabled=true", "train.lr=3e-3"]
    layouts = {"fsdp2": ["train.parallel.dp_shard=2"],
               "ddp": ["train.parallel.dp_replicate=2", "train.parallel.dp_shard=1"],
               "fsdp2-lora": ["train.parallel.dp_shard=2", *lora]}  # fmt: skip
    path = RECIPES["sd3"][0]
    runs = {name: load_config(path, [*common, "train.nproc_per_node=2", *o], workdir=tmp_path / name)
            for name, o in layouts.items()}  # fmt: skip
    job_error = run_together(runs, 2)
    single = launch(load_config(path, [*common, "train.grad_accum=2"], workdir=tmp_path / "one"), None, None)
    single_lora = launch(load_config(path, [*common, "train.grad_accum=2", *lora], workdir=tmp_path / "one-lora"),
                         None, None)  # fmt: skip
    assert single.losses[0] == pytest.approx(math.log(2), abs=1e-6) and single.losses[-1] < single.losses[0]
    for name in layouts:
        want = single_lora if name.endswith("lora") else single
        assert result(runs, name, job_error).losses == pytest.approx(want.losses, abs=1e-5), name


# ---- per-sample losses of every family the method serves ----------------------------------------------------------
def _video_case(family: str) -> tuple[nn.Module, object, dict[str, torch.Tensor]]:
    """A tiny video denoiser and a cached-style batch (posterior mean ++ log-variance, text states, VAE scale)."""
    fam, cfg = get_family(family), ModelConfig(family=family, max_text_length=16)
    frames = {"cogvideox": 3, "wan": 2}[family]
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 16, frames, 8, 8, generator=gen), -2 + 0.1 * torch.randn(2, 16, frames, 8, 8)
    batch = {
        "latent_params": torch.cat([mean, logvar], 1), "text_embeds": torch.randn(2, 16, 32, generator=gen),
        "scaling_factor": torch.full((2,), 0.7), "shift_factor": torch.zeros(2),
    }  # fmt: skip
    return fam.load_transformer(cfg, 32, 16).eval(), fam.load_scheduler(cfg), batch


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "cogvideox", "wan"])
def test_per_sample_losses_average_to_the_family_loss(family: str) -> None:
    fam = get_family(family)
    if family in ("cogvideox", "wan"):
        model, scheduler, batch = _video_case(family)
    else:
        model, batch = seeded_denoiser(family, "tiny"), image_batch(family, "tiny", 8, 8)
        scheduler = fam.load_scheduler(ModelConfig(family=family))
    with torch.no_grad():
        plain = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(3))
        with per_sample_losses():
            each = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(3))
    assert plain.shape == () and each.shape == (2,)
    assert not torch.equal(each[0], each[1])  # two samples, two losses (not one value broadcast)
    # the same float32 forward; only the order of the final mean's sums may differ (a few ulps)
    torch.testing.assert_close(each.mean(), plain, rtol=1e-6, atol=0)


def test_both_images_of_a_pair_get_the_same_noise_and_timestep() -> None:
    fam, model = get_family("sd3"), seeded_denoiser("sd3", "tiny")
    batch, scheduler = image_batch("sd3", "tiny", 8, 8), fam.load_scheduler(ModelConfig(family="sd3"))
    other = {**batch, "latent_params": batch["latent_params"].flip(0)}  # another image for each prompt
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    with torch.no_grad():
        same_w, same_l = pair_losses(fam, model, scheduler, batch, dict(batch), gen)
        l_w, l_l = pair_losses(fam, model, scheduler, batch, other, gen)
        with per_sample_losses():
            own = fam.training_loss(model, scheduler, batch, torch.Generator().manual_seed(5))
    assert torch.equal(gen.get_state(), state)  # the engine's generator is only read
    assert torch.equal(same_w, same_l) and torch.equal(l_w, own)  # one draw for both sides, the family's own
    assert not torch.allclose(l_l, l_w)


# ---- the objective and the refusals -------------------------------------------------------------------------------
def test_the_objective_is_the_authors() -> None:
    l_w, l_l = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    r_w, r_l = torch.tensor([1.5, 1.5]), torch.tensor([1.5, 1.5])
    loss, m = dpo_objective(l_w, l_l, r_w, r_l, beta=2.0)
    inside = torch.tensor([1.0, -1.0])  # -0.5 * 2 * ((l_w - l_l) - (r_w - r_l))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(inside).mean().item())
    assert m["train/chosen_reward"].item() == pytest.approx(0.0)  # -(l_w - r_w): +0.5 and -0.5
    assert m["train/rejected_reward"].item() == pytest.approx(0.0)
    assert m["train/margin"].item() == pytest.approx(0.0) and m["train/accuracy"].item() == 0.5
    _, m = dpo_objective(l_w[:1], l_l[:1], r_w[:1], r_l[:1], beta=2.0)
    assert (m["train/chosen_reward"].item(), m["train/rejected_reward"].item()) == (0.5, -0.5)
    assert m["train/margin"].item() == 1.0 and m["train/accuracy"].item() == 1.0


def test_a_cache_without_pairs_and_a_batch_mean_objective_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r'1 of the 2 samples.*"chosen": "a.png", "rejected": "b.png"'):
        require_pairs([{"preference": True, "tensors": ["rejected_latent_params"]}, {"source": "x.png"}], "here")
    # the check before any model loads reads the prepped samples
    cfg = load_config(REPO / "configs" / "sd3-quickstart.yaml", ["train.method.name=diffusion_dpo"], workdir=tmp_path)
    cfg.prep_dir.mkdir(parents=True)
    (cfg.prep_dir / "samples.jsonl").write_text('{"source": "clip.mp4", "tensors": ["latent_params"]}\n')
    with pytest.raises(ValueError, match="preference pairs.*clip.mp4.*data.manifest"):
        get_method("diffusion_dpo").check(get_family("sd3"), cfg)
    # Wan2.2 A14B training both experts picks one per call: the two sides would not share a denoiser
    a14b = load_config(REPO / "configs" / "pipelines" / "wan-t2v-a14b.yaml", ["train.method.name=diffusion_dpo"],
                       workdir=tmp_path / "a14b")  # fmt: skip
    with pytest.raises(ValueError, match="model.experts.train=both.*high_noise or low_noise"):
        get_method("diffusion_dpo").check(get_family("wan"), a14b)
    # an objective that still returns the batch mean inside per_sample_losses() is named, with the fix
    fam = SimpleNamespace(name="meanonly", training_loss=lambda m, s, b, g: b["latent_params"].mean())
    batch = {"latent_params": torch.ones(2, 8, 4, 4)}
    with pytest.raises(ValueError, match=r"meanonly's objective.*got shape \(\) for a batch of 2.*batch_loss"):
        pair_losses(fam, nn.Identity(), None, batch, batch, torch.Generator())
