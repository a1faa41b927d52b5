"""Configs are checked before any work starts (issue 19 item 3): every mistake the config alone reveals is
refused by `load_config` with one paragraph naming the key, the value and the fix; what depends on the
machine (paths) is refused when a stage starts, before it writes anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from flowspeed.configs import ConfigError, catalog, load_config
from flowspeed.configs.catalog import (
    BENCHMARKS,
    CAPTIONERS,
    DECODERS,
    FAMILIES,
    MEGATRON_FAMILIES,
    PROMPT_TEMPLATES,
    TASK_RUNNERS,
    clip_models,
)
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.configs.validate import check_stage, config_problems, stage_problems
from flowspeed.flows.config_cli import config_app
from typer.testing import CliRunner

from tests.conftest import QUICKSTART, REPO

PIPELINES = REPO / "configs" / "pipelines"
MEGATRON = PIPELINES / "qwen2_vl-sft-megatron.yaml"
SDXL = REPO / "configs" / "sdxl-quickstart.yaml"
SHIPPED = sorted(
    [*(REPO / "configs").glob("*.yaml"), *PIPELINES.rglob("*.yaml"), *(REPO / "configs" / "eval").rglob("*.yaml")]
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


# (config, overrides, words the refusal must contain: the key, the value, the allowed values or the fix)
MISTAKES = {
    "unknown family": (QUICKSTART, ["model.family=nope"], ["model.family='nope'", "cogvideox", "whisper"]),
    "family typo": (QUICKSTART, ["model.family=cogvidex"], ["model.family='cogvidex'", "did you mean cogvideox?"]),
    "transformer preset": (
        QUICKSTART,
        ["model.transformer.preset=2B"],
        ["model.transformer.preset='2B' is not a transformer preset of cogvideox", "tiny, 2b", "pretrained"],
    ),
    "vae preset of a video DiT": (
        PIPELINES / "published" / "opensoraplan-v1.3-i2v.yaml",
        ["model.vae.pretrained=null", "model.vae.preset=wfvae-v13"],
        ["model.vae.preset='wfvae-v13'", "did you mean wfvae-v1.3?", "tiny-causalvae"],
    ),
    "text encoder preset": (SDXL, ["model.text_encoder.preset=base"], ["model.text_encoder.preset='base'", "tiny"]),
    "clip model": (QUICKSTART, ["eval.clip.model=ViT-B-23"], ["eval.clip.model='ViT-B-23'", "ViT-B-32"]),
    "gate metric outside the run's metrics": (
        QUICKSTART,
        ["tracking.registry.gates=[{metric: val_loss}]"],
        ["tracking.registry.gates[0].metric='val_loss'", "eval/val_loss"],
    ),
    "layout vs world size (dp_shard=-1)": (
        QUICKSTART,
        ["train.nproc_per_node=2", "train.parallel.tp=3"],
        [r"dp_replicate=1 x dp_shard=? x cp=1 x tp=3 x pp=1", "world size 2", "train.nproc_per_node=2"],
    ),
    "layout vs world size (explicit)": (
        QUICKSTART,
        ["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.parallel.cp=2"],
        ["dp_shard=2 x cp=2 x tp=1 x pp=1 = 4, but the world size is 2", "dp_shard: -1"],
    ),
    "lora with tp": (
        QUICKSTART,
        ["train.nproc_per_node=2", "train.parallel.dp_shard=1", "train.parallel.tp=2", "train.lora.enabled=true"],
        ["train.lora with train.parallel.tp > 1", "tp=2", "dp_shard"],
    ),
    "tp on a family without a plan": (
        SDXL,
        ["train.nproc_per_node=2", "train.parallel.tp=2"],
        ["train.parallel.tp=2: the torch engine has no tensor-parallel plan for sdxl", "cogvideox", "tp: 1"],
    ),
    "dsp on a model other than STDiT3": (
        QUICKSTART,
        ["train.nproc_per_node=2", "train.parallel.cp=2", "train.parallel.cp_mode=dsp"],
        ["train.parallel.cp=2 with cp_mode=dsp: DSP (cp_mode=dsp) splits STDiT3 only", "cp_mode: ulysses or ring"],
    ),
    "cp on a family without a plan": (
        SDXL,
        ["train.nproc_per_node=2", "train.parallel.cp=2"],
        ["train.parallel.cp=2 with cp_mode=ulysses: there is no context-parallel plan for sdxl", "cp: 1"],
    ),
    "eval dsp on a model other than STDiT3": (
        QUICKSTART,
        ["eval.nproc_per_node=2", "eval.parallel.cp=2", "eval.parallel.cp_mode=dsp"],
        ["eval.parallel.cp=2 with cp_mode=dsp: DSP (cp_mode=dsp) splits STDiT3 only", "cp_mode: ulysses or ring"],
    ),
    "eval cp on a family without a plan": (
        SDXL,
        ["eval.nproc_per_node=2", "eval.parallel.cp=2"],
        ["eval.parallel.cp=2 with cp_mode=ulysses: there is no context-parallel plan for sdxl", "cp: 1"],
    ),
    "pp on the torch engine": (
        QUICKSTART,
        ["train.nproc_per_node=2", "train.parallel.pp=2"],
        ["train.parallel.pp=2: the torch engine does not train with pipeline parallel", "pp: 1"],
    ),
    "ddp with tp": (
        QUICKSTART,
        ["train.nproc_per_node=4", "train.parallel.dp_replicate=2", "train.parallel.tp=2"],
        ["(tp=2, cp=1) with pure replication (dp_replicate=2, dp_shard=1)", "DDP cannot wrap DTensor"],
    ),
    "interleaved without virtual stages": (
        QUICKSTART,
        ["train.parallel.pp_schedule=interleaved_1f1b"],
        ["interleaved_1f1b needs pp_virtual_stages >= 2", "got 1"],
    ),
    "nnodes without rendezvous": (QUICKSTART, ["train.nnodes=2"], ["train.nnodes=2 needs train.rdzv_endpoint"]),
    "node rank": (QUICKSTART, ["train.node_rank=1"], ["train.node_rank=1 must be below train.nnodes=1"]),
    "megatron with a diffusion family": (
        QUICKSTART,
        ["train.engine=megatron"],
        [
            "train.engine=megatron trains qwen2_vl, llava, qwen2_5_vl; 'cogvideox' trains on the torch",
            "train.engine=torch",
        ],
    ),
    "megatron with lora": (MEGATRON, ["train.lora.enabled=true"], ["train.lora is not supported on the megatron"]),
    "megatron with ema": (MEGATRON, ["train.ema.enabled=true"], ["train.ema.enabled: not available on the megatron"]),
    "megatron tp x pp vs ranks": (MEGATRON, ["train.parallel.tp=3"], ["tp=3 x pp=2 x cp=1 = 6 does not divide the 2"]),
    "megatron micro-batches": (
        MEGATRON,
        ["train.parallel.pp_virtual_stages=2", "train.grad_accum=3"],
        ["micro-batches per step (3) to be a multiple of pp=2", "train.grad_accum"],
    ),
    "megatron sequence parallel without tp": (
        MEGATRON,
        ["train.parallel.sequence_parallel=true"],
        ["sequence_parallel=true needs tp > 1"],
    ),
    "vision tower switch on a family without one": (
        QUICKSTART,
        ["model.freeze_vision_tower=true"],
        ["model.freeze_vision_tower", "'cogvideox' has no vision tower", "remove the key"],
    ),
    "frames against 4k+1": (QUICKSTART, ["data.num_frames=8"], ["data.num_frames=8", "4k+1 frames (e.g. 5 or 9)"]),
    "frames of an image family": (SDXL, ["data.num_frames=9"], ["data.num_frames=9", "sdxl is an image model"]),
    "bucket frames": (
        QUICKSTART,
        ["data.buckets.mode=opensora", "data.buckets.bucket_config={240p: {8: [1.0, 2]}}"],
        ["data.buckets.bucket_config[240p][8]", "4k+1"],
    ),
    "size multiple": (QUICKSTART, ["data.height=60"], ["data.height=60 must be a multiple of 16", "e.g. 48"]),
    "manifest format": (
        QUICKSTART,
        ["data.manifest_format=jsnol"],
        ["data.manifest_format='jsnol'", "auto", "jsonl", "sharegpt"],
    ),
    "captioner": (QUICKSTART, ["data.caption.model=blip"], ["data.caption.model='blip'", "qwen2_vl", "internvl"]),
    "captioner preset": (
        QUICKSTART,
        ["data.caption.enabled=true", "data.caption.model=llava"],
        ["data.caption.preset='tiny'", "llava", "data.caption.pretrained"],
    ),
    "resume literal": (QUICKSTART, ["train.resume=sometimes"], ["train.resume='sometimes'", "auto", "never", "./"]),
    "device": (QUICKSTART, ["train.device=gpu"], ["train.device='gpu'", "cuda"]),
    "task runner literal": (QUICKSTART, ["data.task_runner=slurm"], ["data.task_runner", "'thread'", "'ray'"]),
    "decoder literal": (QUICKSTART, ["data.decoder=ffmpeg"], ["data.decoder", "'decord'", "'pyav'"]),
    "literal of a nested section": (QUICKSTART, ["train.parallel.cp_mode=rings"], ["train.parallel.cp_mode", "'ring'"]),
    "benchmark": (
        QUICKSTART,
        ["eval.benchmarks=[{name: mmlu, tsv: x.tsv, template: nope}]"],
        ["eval.benchmarks[0].name='mmlu'", "ai2d", "eval.benchmarks[0].template='nope'"],
    ),
    "gate metric": (
        QUICKSTART,
        ["tracking.registry.gates=[{metric: eval/bogus}]"],
        ["eval/bogus", "direction: lower|higher"],
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_load_refuses_the_mistake_naming_key_value_and_fix(name: str) -> None:
    config, overrides, words = MISTAKES[name]
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    msg = str(err.value)
    assert msg.startswith(f"invalid config {config}:")
    for word in words:
        assert word in msg, f"{word!r} not in:\n{msg}"
    assert "Traceback" not in msg


def test_every_mistake_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["model.family=nope", "train.resume=sometimes", "data.manifest_format=x"])
    assert [line.split("=")[0].strip() for line in str(err.value).splitlines()[1:]] == [
        "model.family",
        "data.manifest_format",
        "train.resume",
    ]


def test_unchecked_load_returns_the_config_and_the_launchers_refuse_it_in_the_same_words() -> None:
    from flowspeed.engines.torch_engine.launch import validate_layout

    cfg = load_config(QUICKSTART, ["train.nproc_per_node=2", "train.parallel.tp=3"], check=False)
    assert config_problems(cfg)
    with pytest.raises(ValueError, match=r"dp_replicate=1 x dp_shard=\? x cp=1 x tp=3 x pp=1"):
        validate_layout(cfg)
    ok = load_config(QUICKSTART, ["train.nproc_per_node=2", "train.parallel.tp=2"])
    assert validate_layout(ok).dp_shard == 1


def test_the_megatron_launcher_refuses_in_the_same_words() -> None:
    from flowspeed.engines.megatron.trainer import validate

    cfg = load_config(QUICKSTART, ["train.engine=megatron"], check=False)
    with pytest.raises(ValueError, match="train.engine=megatron trains qwen2_vl, llava, qwen2_5_vl; 'cogvideox'"):
        validate(cfg)
    validate(load_config(MEGATRON))


def test_the_catalog_is_the_registries() -> None:
    """The light table the checks read agrees with what the stages will do: names, frame rules, sizes,
    vision towers, the megatron engine's models, prep's captioners (and their presets), the benchmarks."""
    import torch
    from flowspeed.configs.schema import CaptionConfig
    from flowspeed.datasets_prep.caption import CAPTIONERS as REAL_CAPTIONERS
    from flowspeed.engines.megatron.vlm import MODELS
    from flowspeed.engines.models import get_family, known_families
    from flowspeed.evaluation import benchmarks

    assert sorted(FAMILIES) == known_families()
    for name, facts in FAMILIES.items():
        family = get_family(name)
        assert type(family).__module__ == facts.module, name
        for n in range(1, 70):
            assert (family.frame_count_error(n) is None) == (facts.frame_error(name, n) is None), (name, n)
        assert family.size_multiple == facts.size_multiple, name
        for vae in (facts.presets or {}).get("vae", ()):  # each VAE preset's size rule (Wan2.2's 16x VAE: 32)
            model = ModelConfig(family=name, vae=ComponentConfig(preset=vae))
            assert family.size_multiple_for(model) == facts.size_multiple_for(model), (name, vae)
        assert bool(family.vision_tower) == facts.vision_tower, name
    assert MEGATRON_FAMILIES == tuple(MODELS)
    assert BENCHMARKS == tuple(benchmarks.BENCHMARKS) and PROMPT_TEMPLATES == tuple(benchmarks.PROMPT_TEMPLATES)
    assert sorted(CAPTIONERS) == sorted(REAL_CAPTIONERS)
    for name, presets in CAPTIONERS.items():
        for preset in {"tiny", "nope"} - set(presets):
            with pytest.raises(ValueError, match="preset|pretrained"):
                REAL_CAPTIONERS[name](CaptionConfig(model=name, preset=preset), torch.device("cpu"))


def test_the_catalog_export_files_are_each_familys(tmp_path: Path) -> None:
    """Prefect's cache checks read what makes an export whole from the catalog (a cached stage then imports no
    model library): the same files and denoiser folder as the family's own, sharded transformers weights too."""
    from flowspeed.engines.models import get_family

    final = tmp_path / "final"
    for name, facts in FAMILIES.items():
        family = get_family(name)
        assert facts.export_files(final) == family.export_files(final), name
        assert facts.denoiser_subfolder == family.denoiser_subfolder, name
    final.mkdir()
    (final / "model.safetensors.index.json").write_text("{}")  # a sharded transformers export
    for name, facts in FAMILIES.items():
        assert facts.export_files(final) == get_family(name).export_files(final), name


def _presets_the_loader_knows(family: object, component: str) -> list[str]:
    """Ask `family`'s own loader for `component` built from an unknown preset: it refuses, listing the ones it
    builds (`pick_preset`'s "known presets: ..." or the video DiTs' `build_component` "known: ...")."""
    cfg = ModelConfig(family=family.name, **{component: ComponentConfig(preset="no-such-preset")})  # type: ignore[attr-defined]
    load = {
        "vae": lambda: family.load_vae(cfg),  # type: ignore[attr-defined]
        "text_encoder": lambda: family.load_text_encoder(cfg),  # type: ignore[attr-defined]
        "transformer": lambda: family.load_transformer(cfg, 32, 4),  # type: ignore[attr-defined]
        "image_encoder": lambda: family.load_image_encoder(cfg),  # type: ignore[attr-defined]
    }[component]
    with pytest.raises(ValueError, match="no-such-preset") as err:
        load()
    known = re.search(r"known(?: presets)?: (.*?)(?:\. |$)", str(err.value))
    assert known, str(err.value)
    return known.group(1).split(", ")


def test_the_catalog_presets_are_what_each_family_builds() -> None:
    """`model.<component>.preset` is refused at load exactly when the family's loader would refuse it: the
    components each family builds from the config (all three for latent families, the one model otherwise)
    and, for each, the presets its loader takes."""
    from flowspeed.engines.models import get_family
    from flowspeed.engines.models.registry import Capability

    for name, facts in FAMILIES.items():
        family = get_family(name)
        built = ("vae", "text_encoder", "transformer") if family.can(Capability.LATENTS) else ("transformer",)
        if family.can(Capability.LATENTS) and family.load_image_encoder(ModelConfig(family=name)) is not None:
            built += ("image_encoder",)
        assert facts.presets is not None and sorted(facts.presets) == sorted(built), name
        for component in built:
            assert sorted(facts.presets[component]) == sorted(_presets_the_loader_knows(family, component)), (
                name,
                component,
            )


def test_the_catalog_parallel_plans_are_the_torch_engines() -> None:
    """TP/CP/DSP are refused at load for a family exactly when the engine has no plan for its trained model (each
    family's tiny build on the meta device; every named variant of a family is the same class, see variants.py)."""
    from flowspeed.engines.models import get_family
    from flowspeed.engines.models.dits.stdit3 import STDiT3
    from flowspeed.engines.models.variants import MODEL, build_on_meta

    for name, facts in FAMILIES.items():
        family = get_family(name)
        model = build_on_meta(name, "tiny")[family.denoiser_subfolder or MODEL]
        plans = family.parallel_plans(model)
        real = {k for k, v in plans.items() if v} | ({"dsp"} if isinstance(model, STDiT3) else set())
        assert facts.parallel == real, name


def test_the_catalog_runners_decoders_and_clip_models_are_the_real_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import flowspeed.evaluation.clip_score  # noqa: F401  (adds our open_clip configs, as an eval does)
    import open_clip
    from flowspeed.configs.schema import DataConfig
    from flowspeed.datasets_prep.decode import DECODERS as REAL_DECODERS
    from flowspeed.tasks.stages import make_task_runner

    assert DECODERS == tuple(REAL_DECODERS) == get_args(DataConfig.model_fields["decoder"].annotation)
    assert clip_models() == frozenset(open_clip.list_models())
    assert tuple(TASK_RUNNERS) == get_args(DataConfig.model_fields["task_runner"].annotation)
    for runner, package in TASK_RUNNERS.items():
        cfg = load_config(QUICKSTART, [f"data.task_runner={runner}", "data.slices=2"])
        with monkeypatch.context() as m:
            if package is None:
                assert make_task_runner(cfg) is not None
                continue
            m.setitem(sys.modules, package, None)  # not installed: the import fails
            with pytest.raises(ValueError, match=f"data.task_runner={runner} needs"):
                make_task_runner(cfg)
            problems = stage_problems(cfg, "prep")
            assert any(p.startswith(f"data.task_runner={runner} needs") for p in problems), problems


def test_a_family_missing_from_the_catalog_is_asked_of_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new family needs only its module and recipe: until its catalog line exists, the checks read the real
    family (its frame rule, sizes and vision tower), slower but the same answers."""
    monkeypatch.delitem(FAMILIES, "sdxl")
    catalog._registered.cache_clear()
    try:
        assert load_config(SDXL).model.family == "sdxl"
        with pytest.raises(ConfigError, match=r"data.num_frames=9: sdxl is an image model"):
            load_config(SDXL, ["data.num_frames=9"])
        with pytest.raises(ConfigError, match=r"data.height=60 must be a multiple of 16 for sdxl"):
            load_config(SDXL, ["data.height=60"])
        with pytest.raises(ConfigError, match="'sdxl' has no vision tower"):
            load_config(SDXL, ["model.freeze_vision_tower=false"])
        facts = catalog.family_facts("sdxl")
        assert facts is not None and facts.denoiser_subfolder == "unet"  # the cache checks' facts, from the family
        files = facts.export_files(Path("final"))
        assert files == [Path("final/model_index.json"), Path("final/unet/diffusion_pytorch_model.safetensors")]
    finally:
        catalog._registered.cache_clear()


def test_an_unknown_family_is_refused_without_importing_a_model_library() -> None:
    code = (
        "import sys\n"
        "from flowspeed.configs import ConfigError, load_config\n"
        "try:\n"
        "    load_config('configs/quickstart.yaml', ['model.family=cogvidex'])\n"
        "except ConfigError as e:\n"
        "    assert 'did you mean cogvideox' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('accepted')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers') "
        "or m.startswith('flowspeed.engines.models'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---- what depends on the machine: at the start of a stage ---------------------------------------------
def test_paths_are_checked_by_the_stage_that_reads_them(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    cfg = load_config(
        QUICKSTART,
        [f"data.manifest={missing}.jsonl", f"train.resume={missing}", f"eval.model={missing}",
         f"model.vae.pretrained={missing}", "model.text_encoder.pretrained=org/hub-id"],
    )  # fmt: skip
    keys = {s: [p.split("=")[0] for p in stage_problems(cfg, s)] for s in ("prep", "train", "eval", "run")}
    assert keys["prep"] == ["model.vae.pretrained", "data.manifest"]  # a hub id is not a path
    assert keys["train"] == ["model.vae.pretrained", "train.resume"]
    assert keys["eval"] == ["model.vae.pretrained", "eval.model"]
    assert keys["run"] == ["model.vae.pretrained", "data.manifest", "train.resume", "eval.model"]
    with pytest.raises(ConfigError, match=r"data.manifest=.*missing.jsonl: the manifest does not exist.*demo-data"):
        check_stage(cfg, "prep")


def test_media_roots_subfolders_and_clip_checkpoints_are_checked_where_they_are_read(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    cfg = load_config(
        QUICKSTART,
        [f"data.roots=[{tmp_path}, {tmp_path / 'gone'}]", f"model.vae.pretrained={weights}",
         f"data.manifest={tmp_path / 'none.jsonl'}", "model.vae.subfolder=vae",
         f"eval.clip.pretrained={tmp_path / 'clip.pt'}", "eval.clip.model=ViT-B-32",
         "data.curate.aesthetic.enabled=true", f"data.curate.aesthetic.clip.pretrained={tmp_path / 'a.safetensors'}"],
    )  # fmt: skip
    keys = {s: [p.split("=")[0] for p in stage_problems(cfg, s)] for s in ("prep", "eval")}
    assert keys["prep"] == [
        "model.vae.subfolder", "data.roots[1]", "data.manifest", "data.curate.aesthetic.clip.pretrained"
    ]  # fmt: skip
    assert keys["eval"] == ["model.vae.subfolder", "eval.clip.pretrained"]
    tagged = load_config(QUICKSTART, ["eval.clip.pretrained=laion2b_s34b_b79k", "eval.clip.model=ViT-B-32"])
    assert stage_problems(tagged, "eval") == []  # an open_clip tag is the hub's business


def test_a_recipe_naming_cluster_paths_loads_anywhere_and_is_refused_where_they_are_missing() -> None:
    recipe = PIPELINES / "published" / "opensora-v1.2.yaml"
    cfg = load_config(recipe)
    problems = stage_problems(cfg, "train")
    assert any(p.startswith("model.transformer.pretrained=/models/OpenSora-STDiT-v3") for p in problems)


def test_a_complete_setup_passes_every_stage(tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("")
    ckpt = tmp_path / "train" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    cfg = load_config(QUICKSTART, [f"data.manifest={manifest}", f"eval.model={ckpt}"], workdir=tmp_path)
    for stage in ("prep", "train", "eval", "run"):
        assert stage_problems(cfg, stage) == []
    # the export this very run will write is not required to exist before it starts, only by `eval` alone
    final = cfg.train_dir / "final"  # the training folder is keyed by the model, not by what evaluates it
    later = load_config(QUICKSTART, [f"data.manifest={manifest}", f"eval.model={final}"], workdir=tmp_path)
    assert stage_problems(later, "run") == []
    assert [p.split("=")[0] for p in stage_problems(later, "eval")] == ["eval.model"]


# ---- flowspeed config show / validate ----------------------------------------------------------------
def _cli(*args: str | Path) -> object:
    return CliRunner().invoke(config_app, [str(a) for a in args])


def test_config_show_prints_the_resolved_config(tmp_path: Path) -> None:
    import yaml

    out = _cli("show", QUICKSTART, "--set", "train.max_steps=5", "--workdir", tmp_path)
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.stdout)
    assert shown["train"]["max_steps"] == 5 and shown["workdir"] == str(tmp_path)
    assert shown["model"]["max_text_length"] == 128  # from the included preset
    assert load_config(QUICKSTART, ["train.max_steps=5"], tmp_path).model_dump(mode="json") == shown


def test_config_show_of_a_refused_config_prints_it_and_why() -> None:
    out = _cli("show", QUICKSTART, "--set", "train.resume=sometimes")
    assert out.exit_code == 1
    assert "resume: sometimes" in out.stdout and "train.resume='sometimes'" in out.stderr


def test_config_validate(tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("")
    ok = _cli("validate", QUICKSTART, "--set", f"data.manifest={manifest}")
    assert (ok.exit_code, ok.stdout) == (0, "ok\n")
    bad = _cli("validate", QUICKSTART, "--set", "model.family=nope", "--set", f"data.manifest={manifest}")
    assert bad.exit_code == 1 and "model.family='nope' is not a known model family" in bad.stderr
    no_data = _cli("validate", QUICKSTART, "--set", f"data.manifest={tmp_path / 'none.jsonl'}")
    assert no_data.exit_code == 1 and "the manifest does not exist" in no_data.stderr
    elsewhere = f"data.manifest={tmp_path / 'none.jsonl'}"
    assert _cli("validate", QUICKSTART, "--set", elsewhere, "--stage", "train").exit_code == 0  # train reads prep's
    assert _cli("validate", QUICKSTART, "--set", elsewhere, "--no-paths").exit_code == 0
    unknown_key = _cli("validate", QUICKSTART, "--set", "train.max_step=5")
    assert unknown_key.exit_code == 1 and "unknown key `train.max_step`" in unknown_key.stderr


# (overrides written into bad.yaml, the key the refusal names); the manifest exists unless the mistake is its absence
RUN_MISTAKES = {
    "bad preset": (["model.transformer.preset=2B"], "model.transformer.preset='2B'"),
    "bad frame count": (["data.num_frames=8"], "data.num_frames=8"),
    "missing manifest": (["data.manifest=nowhere.jsonl"], "data.manifest=nowhere.jsonl"),
    "tp not dividing the world": (["train.nproc_per_node=2", "train.parallel.tp=3"], "train.parallel"),
    "megatron with a diffusion family": (["train.engine=megatron"], "train.engine=megatron"),
    "unknown gate metric": (
        ["tracking.registry.enabled=true", "tracking.registry.gates=[{metric: eval/bogus}]"],
        "tracking.registry.gates.0",
    ),
    "unknown key": (["train.max_step=5"], "train.max_step"),
}


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(RUN_MISTAKES))
def test_flowspeed_run_on_a_mistake_fails_naming_the_key_and_writes_nothing(tmp_path: Path, name: str) -> None:
    """`flowspeed run bad.yaml` in a fresh folder: exit 1, one paragraph naming the key, and not a file or folder
    more than was there (no workdir, no prep, no MLflow store, no Prefect database)."""
    import yaml
    from flowspeed.configs.loader import apply_overrides

    overrides, key = RUN_MISTAKES[name]
    (tmp_path / "data.jsonl").write_text('{"path": "clip.mp4", "caption": "a clip"}\n')
    recipe = apply_overrides({"include": str(QUICKSTART), "data": {"manifest": "data.jsonl"}}, overrides)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    before = _files(tmp_path)
    script = Path(sys.executable).with_name("flowspeed")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flowspeed.flows.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*command, "run", "bad.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    message = out.stdout + out.stderr
    assert out.returncode == 1, message
    assert "invalid config bad.yaml" in message and key in " ".join(message.split()), message
    assert "Traceback" not in message
    assert _files(tmp_path) == before


def test_flowspeed_run_refuses_before_writing_anything(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for mistake, named in (("model.family=nope", "model.family"), ("train.parallel.tp=3", "tp=3")):
        out = subprocess.run(
            [sys.executable, "-m", "flowspeed.flows.cli", "run", "configs/quickstart.yaml", "--workdir", str(work),
             "--set", mistake],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 1, out.stderr
        assert named in out.stderr and "Traceback" not in out.stderr
        assert not work.exists()


def test_flowspeed_config_show_and_validate_through_the_installed_command(tmp_path: Path) -> None:
    """The sub-commands as users type them (mounted on the main app): `show` prints the resolved config, the
    included preset's values and the --set overrides in it; `validate` says ok, or names the key to fix."""
    import yaml

    (tmp_path / "data.jsonl").write_text("")
    script = Path(sys.executable).with_name("flowspeed")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flowspeed.flows.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def flowspeed(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    shown = flowspeed("config", "show", str(QUICKSTART), "--set", "train.max_steps=7", "-s", "data.manifest=data.jsonl")
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["train"]["max_steps"] == 7 and resolved["data"]["manifest"] == "data.jsonl"
    assert resolved["model"]["max_text_length"] == 128  # from presets/cogvideox-tiny.yaml, the included file
    assert resolved["train"]["lr"] == 1e-3 and resolved["eval"]["fps"] == 8  # the file's value, a default
    ok = flowspeed("config", "validate", str(QUICKSTART), "--set", "data.manifest=data.jsonl")
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr
    bad = flowspeed("config", "validate", str(QUICKSTART), "--set", "data.manifest=data.jsonl",
                    "--set", "model.transformer.preset=tiny-1.5")  # fmt: skip
    assert bad.returncode == 1 and "model.transformer.preset='tiny-1.5'" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
