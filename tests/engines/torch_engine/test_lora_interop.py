"""LoRA adapters in the ecosystem's formats, held to the outside libraries that read and write them.

Our exports load with peft's `PeftModel.from_pretrained` and, for diffusers families, with the family pipeline's
`load_lora_weights`, giving the merged export's outputs; adapters that peft and diffusers saved start a flowspeed
run through `train.lora.init_from` (the real train-start path, engines/torch_engine/setup.py:build_model).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from flowspeed.configs import ComponentConfig, PipelineConfig, load_config
from flowspeed.configs.adapters import AdapterSettings, adapter_settings
from flowspeed.configs.validate import ConfigError
from flowspeed.engines.export import export_weights, plain_model
from flowspeed.engines.models import get_family
from flowspeed.engines.models.encoders import CLIP_PRESETS
from flowspeed.engines.torch_engine.lora import load_adapter
from flowspeed.engines.torch_engine.setup import build_model, init_distributed
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from tests.conftest import REPO

TEXT_DIM, CHANNELS = 32, 4  # the tiny denoisers' text width and latent channels (any fit a forward pass)
ARGS = {"text_embed_dim": TEXT_DIM, "latent_channels": CHANNELS}
# family -> (model_args, the cached batch the family's objective takes: the denoiser's inputs come from it)
FAMILIES = {
    "sd3": (ARGS, {"latent_params": (2 * CHANNELS, 8, 8), "text_embeds": (12, TEXT_DIM),
                   "pooled_embeds": (2 * CLIP_PRESETS["tiny"]["projection_dim"],)}),
    "flux": (ARGS, {"latent_params": (2 * CHANNELS, 8, 8), "text_embeds": (12, TEXT_DIM),
                    "pooled_embeds": (CLIP_PRESETS["tiny"]["hidden_size"],)}),
    # CogVideoX's positional table is sized to model.max_text_length (226) text tokens
    "cogvideox": (ARGS, {"latent_params": (2 * CHANNELS, 3, 8, 8), "text_embeds": (226, TEXT_DIM)}),
    # a UNet: diffusers' LoRA file keys it `unet.` (StableDiffusionXLLoraLoaderMixin)
    "sdxl": (ARGS, {"latent_params": (2 * CHANNELS, 8, 8), "text_embeds": (12, TEXT_DIM),
                    "pooled_embeds": (CLIP_PRESETS["tiny"]["projection_dim"],)}),
    "qwen2_vl": ({}, {}),
    "qwen2_5_vl": ({}, {}),
    "glm4v": ({}, {}),
}  # fmt: skip
VLMS = ("qwen2_vl", "qwen2_5_vl", "glm4v")  # transformers VLMs: logits on token ids, peft's format only


def _config(family: str, workdir: Path, init_from: Path | None = None) -> PipelineConfig:
    """A LoRA config of rank 4, alpha 8; with `init_from`, rank/alpha/targets left to the adapter."""
    lora = {"init_from": str(init_from)} if init_from else {"rank": 4, "alpha": 8.0}
    return PipelineConfig.model_validate({"workdir": str(workdir), "model": {"family": family},
                                          "train": {"lora": {"enabled": True, **lora}}})  # fmt: skip


def _batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family in VLMS:
        return {"input_ids": torch.randint(10, 200, (1, 12), generator=g)}
    batch = {k: torch.randn(1, *shape, generator=g) for k, shape in FAMILIES[family][1].items()}
    return {**batch, "scaling_factor": torch.ones(1)}


def _output(family: str, cfg: PipelineConfig, model: torch.nn.Module) -> torch.Tensor:
    """The model's output on fixed inputs: a VLM's logits, a denoiser's prediction inside its family's own
    objective (fixed generator), captured from the forward call."""
    batch = _batch(family)
    with torch.no_grad():
        if family in VLMS:
            return model(**batch).logits
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        seen: list[torch.Tensor] = []
        hook = inner.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
        fam = get_family(family)
        fam.training_loss(model.eval(), fam.load_scheduler(cfg.model), batch, torch.Generator().manual_seed(0))
        hook.remove()
    return seen[0]


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Adapters with an effect (peft starts B at zero, which would make every check pass vacuously)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _merged(family: str, cfg: PipelineConfig, final: Path) -> torch.nn.Module:
    fam = get_family(family)
    comp = ComponentConfig(pretrained=str(final), subfolder=fam.denoiser_subfolder or None)
    return fam.load_transformer(cfg.model.model_copy(update={"transformer": comp}), **FAMILIES[family][0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_adapter_loads_in_peft_and_diffusers_like_the_merged_export(family: str, tmp_path: Path) -> None:
    fam, args = get_family(family), FAMILIES[family][0]
    cfg = _config(family, tmp_path)
    trained = plain_model(fam, cfg, args)
    _perturb(trained)
    final = export_weights(fam, cfg, args, trained.state_dict(), tmp_path / "final")

    written = json.loads((final / "lora" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == f"{family}/tiny"
    assert (written["r"], written["lora_alpha"], sorted(written["target_modules"])) == (4, 8, sorted(fam.lora_targets))
    base_out = _output(family, cfg, fam.load_transformer(cfg.model, **args))
    merged_out = _output(family, cfg, _merged(family, cfg, final))
    assert not torch.allclose(merged_out, base_out, atol=1e-3)  # the adapter changes the model

    peft_model = PeftModel.from_pretrained(fam.load_transformer(cfg.model, **args), final / "lora")
    torch.testing.assert_close(_output(family, cfg, peft_model), merged_out, atol=1e-5, rtol=0)

    if family in VLMS:  # no diffusers pipeline: peft's format only
        assert not (final / "lora" / "pytorch_lora_weights.safetensors").exists()
        return
    # the family's pipeline from the export's tiny components, with the base denoiser: diffusers reads our file
    pipe = fam.pipeline_cls.from_pretrained(final, **{fam.denoiser_subfolder: fam.load_transformer(cfg.model, **args)})
    pipe.load_lora_weights(final / "lora")
    denoiser = getattr(pipe, fam.denoiser_subfolder)
    torch.testing.assert_close(_output(family, cfg, denoiser), merged_out, atol=1e-5, rtol=0)


def _peft_adapter(family: str, cfg: PipelineConfig, out: Path) -> dict[str, torch.Tensor]:
    """An adapter as peft users make one: `get_peft_model` on the same base, trained (perturbed), saved."""
    fam = get_family(family)
    targets = list(fam.lora_targets[:3:2])  # two of the family's projections (query and value)
    config = LoraConfig(r=2, lora_alpha=6, target_modules=targets, exclude_modules=fam.lora_exclude)
    model = get_peft_model(fam.load_transformer(cfg.model, **FAMILIES[family][0]), config)
    _perturb(model, seed=3)
    model.save_pretrained(out)
    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("family", ["sd3", "qwen2_vl", "qwen2_5_vl"])
def test_peft_saved_adapter_initialises_a_run(family: str, tmp_path: Path) -> None:
    fam, args = get_family(family), FAMILIES[family][0]
    theirs = _peft_adapter(family, _config(family, tmp_path), tmp_path / "peft")
    cfg = _config(family, tmp_path, init_from=tmp_path / "peft")
    lora = cfg.train.lora  # rank/alpha/targets left out: taken from the adapter
    assert (lora.rank, lora.alpha, lora.target_modules) == (2, 6.0, sorted(fam.lora_targets[:3:2]))
    model = build_model(fam, cfg, args, init_distributed(cfg))
    ours = get_peft_model_state_dict(model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_diffusers_lora_file_initialises_a_run(tmp_path: Path) -> None:
    """A file as diffusers' training scripts save it (`save_lora_weights` with the adapter's metadata)."""
    fam = get_family("sd3")
    cfg = _config("sd3", tmp_path)
    trained = plain_model(fam, cfg, ARGS)
    _perturb(trained, seed=5)
    export_weights(fam, cfg, ARGS, trained.state_dict(), tmp_path / "final")
    lora_file = tmp_path / "final" / "lora" / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") for k in load_file(str(lora_file)))  # what load_lora_weights expects
    run = _config("sd3", tmp_path, init_from=lora_file)
    model = build_model(fam, run, ARGS, init_distributed(run))
    ours, want = get_peft_model_state_dict(model), get_peft_model_state_dict(trained)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)

    # An older script's file, without the adapter's config: settings read as diffusers itself reads them.
    bare = tmp_path / "bare"
    StableDiffusion3Pipeline.save_lora_weights(bare, transformer_lora_layers=want)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tmp_path / "final", transformer=fam.load_transformer(run.model, **ARGS)
    )
    pipe.load_lora_weights(bare)
    theirs = next(iter(pipe.transformer.peft_config.values()))
    file = bare / "pytorch_lora_weights.safetensors"
    expected = AdapterSettings("diffusers", file, theirs.r, theirs.lora_alpha, sorted(theirs.target_modules),
                               "transformer")  # fmt: skip
    assert adapter_settings(bare) == expected


def _from_adapter(tmp_path: Path, adapter: Path, *overrides: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "sd3-quickstart.yaml", ["train.lora.enabled=true",
                       f"train.lora.init_from={adapter}", *overrides], workdir=tmp_path)  # fmt: skip


def test_init_from_mismatch_and_missing_adapter_are_refused_at_load(tmp_path: Path) -> None:
    _peft_adapter("sd3", _config("sd3", tmp_path), tmp_path / "peft")
    assert _from_adapter(tmp_path, tmp_path / "peft").train.lora.rank == 2
    with pytest.raises(ConfigError, match=r"train.lora.rank=8 but the adapter .* was trained with 2"):
        _from_adapter(tmp_path, tmp_path / "peft", "train.lora.rank=8")
    with pytest.raises(ConfigError, match=r"train.lora.init_from=.*nowhere: no adapter at"):
        _from_adapter(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="needs train.lora.enabled: true"):
        _from_adapter(tmp_path, tmp_path / "peft", "train.lora.enabled=false")


def test_adapter_of_an_older_flowspeed_export_still_loads(tmp_path: Path) -> None:
    """final/lora before the peft format: flowspeed's own JSON and keys without peft's wrapper prefix."""
    fam = get_family("sd3")
    cfg = _config("sd3", tmp_path)
    old = plain_model(fam, cfg, ARGS)
    _perturb(old, seed=7)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                            "target_modules": list(fam.lora_targets)}))  # fmt: skip
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(old).items()},
        str(folder / "adapter_model.safetensors"),
    )
    again = load_adapter(plain_model(fam, cfg, ARGS), folder)
    assert all(torch.equal(a, b) for a, b in zip(get_peft_model_state_dict(again).values(),
                                                 get_peft_model_state_dict(old).values(), strict=True))  # fmt: skip
