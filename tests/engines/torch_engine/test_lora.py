from pathlib import Path

import pytest
import torch
from flowspeed.configs import ComponentConfig, PipelineConfig
from flowspeed.engines.launch import launch
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.torch_engine.lora import apply_lora, load_adapter, merge, save_adapter
from safetensors.torch import load_file

from tests.conftest import make_config


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 128, 32, generator=g), timestep=torch.tensor([500]))  # fmt: skip


def test_lora_trains_adapters_only_and_reloads_and_merges(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = make_config(tmp_path, prepped.data.manifest, f"data.output_dir={prepped.prep_dir}",
                      f"data.cache_dir={prepped.cache_dir}", "train.max_steps=5", "train.lora.enabled=true",
                      "train.lora.rank=4", "train.lr=1e-2")  # fmt: skip
    fam = get_family("cogvideox")
    base = fam.load_transformer(cfg.model, 32, 4)
    out = launch(cfg, None, None)
    assert len(out.losses) == 5

    in_ckpt = apply_lora(fam.load_transformer(cfg.model, 32, 4), cfg.train.lora, fam.lora_targets)
    ckpt.load_model_weights(ckpt.latest(cfg.train_dir), in_ckpt)
    weights = in_ckpt.state_dict()
    q = "transformer_blocks.0.attn1.to_q"
    assert torch.equal(weights[f"{q}.base_layer.weight"], base.state_dict()[f"{q}.weight"])  # base frozen
    assert weights[f"{q}.lora_B.default.weight"].abs().sum() > 0  # adapters trained (B starts at zero)

    final = Path(out.final_dir)
    adapter = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # adapter-only file
    # Reloaded adapters reproduce the trained model; the merged export matches it within 1e-5.
    reloaded = load_adapter(apply_lora(fam.load_transformer(cfg.model, 32, 4), cfg.train.lora, fam.lora_targets),
                            final / "lora").eval()  # fmt: skip
    trained = apply_lora(fam.load_transformer(cfg.model, 32, 4), cfg.train.lora, fam.lora_targets).eval()
    trained.load_state_dict(weights)
    merged_cfg = cfg.model.model_copy(
        update={"transformer": ComponentConfig(pretrained=str(final), subfolder="transformer")}
    )
    merged = fam.load_transformer(merged_cfg, 0, 0).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        y_trained = trained(**_inputs(), return_dict=False)[0]
        assert torch.equal(reloaded(**_inputs(), return_dict=False)[0], y_trained)
        assert torch.allclose(merged(**_inputs(), return_dict=False)[0], y_trained, atol=1e-5)
        assert not torch.allclose(base.eval()(**_inputs(), return_dict=False)[0], y_trained, atol=1e-4)


def test_lora_targets_that_match_nothing_are_refused() -> None:
    from flowspeed.configs import LoraConfig

    fam = get_family("cogvideox")
    model = fam.load_transformer(PipelineConfig().model, 32, 4)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["qkv_proj"]), fam.lora_targets)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_lora_on_transformers_vlms_adapts_the_language_model_and_merges(name: str, tmp_path: Path) -> None:
    from flowspeed.configs import LoraConfig
    from flowspeed.configs.schema import ModelConfig

    fam = get_family(name)
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(fam.load_model(ModelConfig(family=name)), lora, fam.lora_targets, fam.lora_exclude)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision" in n or "visual" in n for n in trainable)  # the vision tower stays untouched
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapters an effect to check
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(10, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "lora", f"{fam.name}/tiny")
    again = apply_lora(fam.load_model(ModelConfig(family=name)), lora, fam.lora_targets, fam.lora_exclude)
    load_adapter(again, tmp_path / "lora")
    merged = merge(model)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, adapted)
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_lora_on_whisper_reloads_and_merges(tmp_path: Path) -> None:
    from flowspeed.configs import LoraConfig
    from flowspeed.configs.schema import ModelConfig

    fam = get_family("whisper")
    lora = LoraConfig(enabled=True, rank=4)
    model = apply_lora(fam.load_model(ModelConfig(family="whisper")), lora, fam.lora_targets, fam.lora_exclude)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    frames = 2 * model.config.max_source_positions  # the encoder's fixed input length
    inputs = dict(input_features=torch.randn(1, model.config.num_mel_bins, frames, generator=g),
                  decoder_input_ids=torch.randint(0, 200, (1, 6), generator=g))  # fmt: skip
    with torch.no_grad():
        adapted = model(**inputs).logits
    save_adapter(model, tmp_path / "lora", f"{fam.name}/tiny")
    again = load_adapter(apply_lora(fam.load_model(ModelConfig(family="whisper")), lora, fam.lora_targets),
                         tmp_path / "lora")  # fmt: skip
    merged = merge(model)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, adapted)
        assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
