"""Full finetunes of the vision-language families keep the vision tower frozen, as their authors' recipes do.

Sources of the default (model.freeze_vision_tower unset = True):
- Qwen2-VL: QwenLM/Qwen2.5-VL qwen-vl-finetune/qwenvl/train/train_qwen.py `set_model` with its scripts/sft.sh
  (--tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True): patch_embed + blocks frozen, merger trained.
- LLaVA-1.5: haotian-liu/LLaVA@v1.2.2 llava/model/multimodal_encoder/clip_encoder.py (`requires_grad_(False)`
  on the CLIP tower) with scripts/v1_5/finetune.sh (mm_projector and LLM trained).
- InternVL2: OpenGVLab/InternVL internvl_chat/shell/internvl2.0/2nd_finetune/*_full.sh (--freeze_backbone True
  --freeze_mlp False --freeze_llm False).
The tower's size is counted from the model's own submodules (not the family's prefixes), so a wrong prefix fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flowspeed.configs import ComponentConfig, ModelConfig, PipelineConfig, load_config
from flowspeed.engines.loop import TrainResult
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine.lora import apply_lora
from torch import nn

from tests.conftest import REPO

FAMILIES = ("qwen2_vl", "llava", "internvl")


def tower_and_projector(family: str, model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    inner = model.model
    if family == "qwen2_vl":
        return [inner.visual.patch_embed, inner.visual.blocks], inner.visual.merger
    return [inner.vision_tower], inner.multi_modal_projector


def numel(modules: list[nn.Module], trainable: bool | None = None) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if trainable is None or p.requires_grad == trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_freezes_exactly_the_tower_and_false_trains_all(family: str) -> None:
    fam = get_family(family)
    model = fam.set_trainable(fam.load_model(ModelConfig(family=family)), ModelConfig(family=family))
    tower, projector = tower_and_projector(family, model)
    total, tower_n = numel([model]), numel(tower)
    assert 0 < tower_n < total
    assert numel(tower, trainable=True) == 0
    assert numel([model], trainable=True) == total - tower_n  # projector and language model train
    assert numel([projector], trainable=False) == 0 and numel([projector]) > 0

    cfg = ModelConfig(family=family, freeze_vision_tower=False)
    full = fam.set_trainable(fam.load_model(cfg), cfg)
    assert numel([full], trainable=True) == numel([full]) == total


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_still_trains_only_the_adapters(family: str) -> None:
    """The engine freezes the tower before LoRA; LoRA freezes the whole base anyway: same trainable set."""
    fam = get_family(family)
    cfg = load_config(REPO / "configs" / "pipelines" / "qwen2_vl-sft-lora.yaml", [f"model.family={family}"])

    def trainable(freeze: bool) -> set[str]:
        model = fam.load_model(cfg.model)
        if freeze:
            fam.set_trainable(model, cfg.model)
        apply_lora(model, cfg.train.lora, fam.lora_targets, fam.lora_exclude)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    names = trainable(freeze=True)
    assert names == trainable(freeze=False) and names and all("lora_" in n for n in names)


@pytest.mark.parametrize("family", ["whisper", "sd3"])
@pytest.mark.parametrize("value", [True, False])
def test_families_without_a_tower_refuse_the_switch(family: str, value: bool) -> None:
    cfg = ModelConfig(family=family, freeze_vision_tower=value)
    with pytest.raises(ValueError, match=f"freeze_vision_tower applies to vision-language families; '{family}'"):
        get_family(family).frozen_prefixes(cfg)
    assert get_family(family).frozen_prefixes(ModelConfig(family=family)) == ()  # unset: nothing to freeze


@pytest.mark.parametrize(("recipe", "family"), [("whisper-asr", "whisper"), ("sd3-t2i", "sd3")])
def test_launch_refuses_the_switch_before_any_process_starts(recipe: str, family: str, tmp_path: Path) -> None:
    from flowspeed.engines.launch import launch

    path, switch = REPO / "configs" / "pipelines" / f"{recipe}.yaml", ["model.freeze_vision_tower=true"]
    with pytest.raises(ValueError, match=f"'{family}' has no vision tower"):  # at load ...
        load_config(path, switch, workdir=tmp_path)
    cfg = load_config(path, switch, workdir=tmp_path, check=False)
    with pytest.raises(ValueError, match=f"'{family}' has no vision tower"):  # ... and at launch
        launch(cfg, None, None)


def test_megatron_chunks_name_the_same_tower() -> None:
    from flowspeed.engines.megatron.vlm import LlavaMegatron, Qwen2VLMegatron, frozen_vision

    qwen = get_family("qwen2_vl").frozen_prefixes(ModelConfig(family="qwen2_vl"))
    assert frozen_vision(qwen, Qwen2VLMegatron) == ("visual.patch_embed.", "visual.blocks.")  # merger trains
    assert frozen_vision(get_family("llava").vision_tower, LlavaMegatron) == ("vision_tower.",)
    with pytest.raises(ValueError, match="'vision_model.' is not in LlavaMegatron's vision parts"):
        frozen_vision(("vision_model.",), LlavaMegatron)


def test_original_internvl2_layout_freezes_internvit_only() -> None:
    """An opted-in original checkpoint trains as its own InternVLChatModel: its names come from the authors'
    module (tests/facts/internvl2-2b.json, OpenGVLab/InternVL@2410d1db), where InternViT is `vision_model`."""
    keys = json.loads((REPO / "tests" / "facts" / "internvl2-2b.json").read_text())["keys"]
    frozen = {k for k in keys if k.startswith(get_family("internvl").frozen_prefixes(ModelConfig(family="internvl")))}
    assert frozen == {k for k in keys if k.split(".")[0] == "vision_model"} and frozen  # mlp1, language_model train


def test_a_layout_without_the_tower_is_refused() -> None:
    """Prefixes that match nothing (an unknown checkpoint layout) would silently train the tower."""
    with pytest.raises(ValueError, match="no parameter of Linear is under the vision tower"):
        get_family("llava").set_trainable(nn.Linear(2, 2), ModelConfig(family="llava"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowspeed.datasets_prep.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_videos=2, num_images=2)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_one_engine_step_leaves_the_tower_bit_identical(family: str, demo: Path, tmp_path: Path) -> None:
    train_and_compare(f"{family}-sft", demo, tmp_path)


# The 2-rank runs, in one torchrun job for the module (tests/engines/torch_engine/runs_job.py): each test compares
# its own run's export, and a run that fails is named by its test.
TWO_RANK_RUNS = {
    # padded batches: the 2 training samples of the demo would pack into one micro-batch for 2 ranks
    "fsdp2-qwen2_vl": (
        "qwen2_vl-sft",
        ["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.packing.max_tokens=null"],
    ),
    "megatron-qwen2_vl": ("qwen2_vl-sft-megatron", []),  # the recipes' own 2 ranks, 2 pipeline stages
    "megatron-llava": ("llava-sft-megatron", []),
}


@pytest.fixture(scope="module")
def two_rank_runs(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.engines.torch_engine.runs_job import run_together

    runs = {name: prepared(recipe, demo, tmp_path_factory.mktemp(name), *overrides)
            for name, (recipe, overrides) in TWO_RANK_RUNS.items()}  # fmt: skip
    return {"runs": runs, "job_error": run_together(runs, 2)}


def _two_rank_result(two_rank_runs: dict[str, Any], name: str) -> tuple[PipelineConfig, TrainResult]:
    from tests.engines.torch_engine.runs_job import result

    return two_rank_runs["runs"][name], result(two_rank_runs["runs"], name, two_rank_runs["job_error"])


@pytest.mark.slow
def test_fsdp2_shards_a_partly_frozen_model(two_rank_runs: dict[str, Any]) -> None:
    """Two ranks, FSDP2: Qwen2-VL's root group holds the whole vision tower (frozen patch_embed and blocks beside the
    trained merger: its call count varies with the media, parallelize.MEDIA_BLOCK_LISTS) and the embeddings;
    fully_shard reduces only what has a gradient."""
    compare(*_two_rank_result(two_rank_runs, "fsdp2-qwen2_vl"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_megatron_engine_freezes_the_tower_too(family: str, two_rank_runs: dict[str, Any]) -> None:
    """The megatron recipe (2 pipeline stages): the tower lives in the first stage's torch modules."""
    compare(*_two_rank_result(two_rank_runs, f"megatron-{family}"))


def prepared(recipe: str, demo: Path, tmp_path: Path, *overrides: str) -> PipelineConfig:
    """The recipe for one step on the demo data, its prep stage run."""
    from flowspeed.datasets_prep.prep import run_prep

    steps = ["train.max_steps=1", "train.checkpoint_every=1", "train.warmup_steps=0"]
    cfg = load_config(REPO / "configs" / "pipelines" / f"{recipe}.yaml", [*steps, *overrides], workdir=tmp_path)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": demo / Path(cfg.data.manifest).name})})
    run_prep(cfg)
    return cfg


def train_and_compare(recipe: str, demo: Path, tmp_path: Path, *overrides: str) -> None:
    """The engine's own path (prep, launch, export); then export vs the seeded start, parameter by parameter."""
    from flowspeed.engines.launch import launch

    cfg = prepared(recipe, demo, tmp_path, *overrides)
    compare(cfg, launch(cfg, None, None))


def compare(cfg: PipelineConfig, res: TrainResult) -> None:
    """The run's export against the seeded start it trained from: the tower bit-identical, the rest trained."""
    assert len(res.losses) == 1
    family = cfg.model.family
    fam = get_family(family)
    before = dict(fam.load_model(cfg.model).named_parameters())  # the seeded preset the engine started from
    exported = ModelConfig(family=family, transformer=ComponentConfig(preset=None, pretrained=res.final_dir))
    after_model = fam.load_model(exported)
    after = dict(after_model.named_parameters())
    assert after.keys() == before.keys()
    tower, projector = tower_and_projector(family, after_model)
    tower_ids = {id(p) for m in tower for p in m.parameters()}
    tower_names = [n for n, p in after.items() if id(p) in tower_ids]
    assert tower_names and all(torch.equal(after[n], before[n]) for n in tower_names)
    llm = [n for n in after if ".language_model." in n]
    assert llm and any(not torch.equal(after[n], before[n]) for n in llm)
    proj_ids = {id(p) for p in projector.parameters()}
    assert any(not torch.equal(after[n], before[n]) for n, p in after.items() if id(p) in proj_ids)
