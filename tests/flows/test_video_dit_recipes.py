"""The video-DiT finetune recipes: the released-weights recipes name real variants and layouts that fit, and a
finetune through the whole pipeline starts from a checkpoint in the authors' layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from flowspeed.configs import load_config
from flowspeed.datasets_prep.buckets import valid_frames
from flowspeed.engines.models import get_family
from flowspeed.engines.models.dits import opensoraplan
from flowspeed.engines.models.variants import known_variants
from flowspeed.engines.torch_engine.parallel_dims import ParallelDims
from safetensors.torch import load_file

from tests.conftest import REPO

# the DiTs flowspeed defines; Wan and LTX-Video (diffusers-defined) have their own recipe checks in
# tests/engines/models/test_wan.py and test_ltx.py
_RECIPES = REPO / "configs" / "pipelines" / "published"
PUBLISHED = sorted(p for p in _RECIPES.glob("*.yaml") if not p.stem.startswith(("wan", "ltx", "hunyuan")))


def test_there_is_a_released_weights_recipe_per_video_dit_family() -> None:
    families = {load_config(p).model.family for p in PUBLISHED}
    assert families == {"opensora", "opensora1.2", "opensoraplan", "opensoraplan_i2v", "qihoo_t2x"}


@pytest.mark.parametrize("recipe", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_released_weights_recipes_name_real_variants_and_a_layout_that_fits(recipe: Path) -> None:
    cfg = load_config(recipe)
    fam, m, t = get_family(cfg.model.family), cfg.model, cfg.train
    assert m.transformer.preset in fam.transformer_specs and not m.transformer.preset.startswith("tiny")
    assert m.vae.preset in fam.vae_specs and not m.vae.preset.startswith("tiny")
    assert all(c.pretrained for c in (m.vae, m.text_encoder, m.transformer)), "a finetune names every weight file"
    assert len(known_variants(cfg.model.family)) > 1  # its released shapes are in `flowspeed models`
    p = t.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, t.nproc_per_node * t.nnodes)
    assert dims.cp == p.cp
    heads = fam.transformer_specs[m.transformer.preset][1].get("num_attention_heads")
    if p.cp > 1 and p.cp_mode == "ulysses":
        assert heads % p.cp == 0
    frames = [int(n) for per in cfg.data.buckets.bucket_config.values() for n in per] or [cfg.data.num_frames]
    for n in frames:  # every clip length gives a latent length the CP degree divides
        assert fam.frame_count_error(n) is None and valid_frames(n, fam.latent_frame_count, p.cp), (recipe.stem, n)
    for side in (cfg.data.height, cfg.data.width):
        assert side % fam.size_multiple == 0


@pytest.mark.slow
def test_finetune_starts_from_the_authors_checkpoint(tmp_path: Path, mlflow_db: Path) -> None:
    """opensoraplan-t2v with `model.transformer.pretrained` = a v1.3 checkpoint in the authors' layout (their
    trainer's nesting): at a vanishing learning rate the export is that checkpoint, so the pipeline loaded it."""
    from flowspeed.datasets_prep.demo import make_demo_dataset
    from flowspeed.flows.pipeline import pipeline

    demo = tmp_path / "demo"
    make_demo_dataset(demo, num_videos=4, num_images=0)
    recipe = REPO / "configs" / "pipelines" / "opensoraplan-t2v.yaml"
    base = load_config(recipe, workdir=tmp_path / "w0")
    fam = get_family("opensoraplan")
    torch.manual_seed(11)  # a tiny run of theirs, sized like ours: 32-d text states, 4 latent channels
    kwargs = {**opensoraplan.PRESETS["tiny"], **fam.tiny_overrides(base.model, 32, 4)}
    theirs = opensoraplan.OpenSoraT2V_v1_3(**kwargs)
    released = opensoraplan.to_published(theirs.state_dict())
    ckpt = tmp_path / "checkpoint-1000.pt"
    torch.save({"ema": released, "optimizer": {}}, ckpt)
    cfg = load_config(recipe, [f"data.manifest={demo / 'data.jsonl'}", "data.buckets.mode=fixed",
                               "train.max_steps=2", "train.lr=1e-12",
                               "train.warmup_steps=0", f"model.transformer.pretrained={ckpt}",
                               "eval.prompts=[a]", "eval.num_inference_steps=1"],
                      workdir=tmp_path / "w1")  # fmt: skip
    (tmp_path / "w1").mkdir(exist_ok=True)
    shutil.copyfile(mlflow_db, tmp_path / "w1" / "mlflow.db")  # the workdir's MLflow store, its schema made once
    out = pipeline(cfg)
    exported = load_file(str(Path(out["train"]["final_dir"]) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(released)
    worst = max((exported[k].float() - released[k].float()).abs().max().item() for k in released)
    assert worst < 1e-6, f"the finetune did not start from the checkpoint (max diff {worst:.2e})"
