"""`flowspeed convert`: HF folder -> megatron shards -> HF folder is byte for byte, resharding too, a VLM keeps
its vision tower, and bad inputs are refused with one paragraph (in-process CLI: no spawned ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.engines.megatron.test_megatron_convert import _hf_model


def flowspeed(*args: str | Path) -> object:
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    return CliRunner(env={"COLUMNS": "400"}).invoke(app, ["convert", *map(str, args)])


def _saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _file_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _assert_same(original: torch.nn.Module, back: torch.nn.Module) -> None:
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _tiny_qwen2_vl() -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=200, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False)  # fmt: skip
    vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])  # untied with qkv bias; tied embeddings
def test_hf_to_megatron_and_back_is_byte_for_byte(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = _hf_model(kind)
    src = _saved(hf, tmp_path / "hf")
    out = flowspeed("hf-to-megatron", src, tmp_path / "mg", "--tp", "2", "--pp", "2")
    assert out.exit_code == 0, out.output
    assert "4 shards (tp=2, pp=2)" in out.stdout and f"({sum(p.numel() for p in hf.parameters()):,})" in out.stdout
    mg = tmp_path / "mg"
    names = {p.name for p in mg.iterdir()}
    assert {"tp00_pp000.safetensors", "tp01_pp001.safetensors", "megatron.json", "hf_rest.safetensors"} <= names
    assert (mg / "hf" / "config.json").is_file() and not list((mg / "hf").glob("*.safetensors"))
    meta = json.loads((mg / "megatron.json").read_text())
    assert (meta["tp"], meta["pp"], meta["hf_prefix"]) == (2, 2, "model.")
    assert meta["shape"]["tied_embeddings"] is (kind == "llama") and meta["shape"]["qkv_bias"] is (kind == "qwen2")

    out = flowspeed("megatron-to-hf", mg, tmp_path / "back")
    assert out.exit_code == 0, out.output
    assert _file_keys(tmp_path / "back") == _file_keys(src)  # no lm_head.weight for the tied llama, as saved
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    _assert_same(hf, back)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)


def test_a_sharded_folder_reshards_and_comes_back_equal(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = _hf_model("qwen2")
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB")  # a sharded folder: model.safetensors.index.json
    assert (src / "model.safetensors.index.json").is_file()
    assert flowspeed("hf-to-megatron", src, tmp_path / "tp2pp2", "--tp", "2", "--pp", "2").exit_code == 0
    out = flowspeed("reshard", tmp_path / "tp2pp2", tmp_path / "tp1pp1", "--tp", "1", "--pp", "1")
    assert out.exit_code == 0, out.output
    assert "1 shards (tp=1, pp=1)" in out.stdout
    assert sorted(p.name for p in (tmp_path / "tp1pp1").glob("tp*.safetensors")) == ["tp00_pp000.safetensors"]
    assert flowspeed("megatron-to-hf", tmp_path / "tp1pp1", tmp_path / "back").exit_code == 0
    _assert_same(hf, AutoModelForCausalLM.from_pretrained(tmp_path / "back"))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])  # Qwen2.5-VL: the same decoder, another vision tower
def test_a_vlm_keeps_its_vision_tower(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from tests.engines.megatron.test_megatron_vlm import tiny_qwen2_5_vl

    hf = _tiny_qwen2_vl() if kind == "qwen2_vl" else tiny_qwen2_5_vl()
    architecture = type(hf).__name__
    src = _saved(hf, tmp_path / "hf")
    out = flowspeed("hf-to-megatron", src, tmp_path / "mg", "--tp", "2")
    assert out.exit_code == 0, out.output
    with safe_open(str(tmp_path / "mg" / "hf_rest.safetensors"), "pt") as f:
        rest = set(f.keys())
    assert rest and all("visual." in k for k in rest)  # the decoder went to the shards, the vision tower here
    meta = json.loads((tmp_path / "mg" / "megatron.json").read_text())
    assert meta["shape"]["mrope_section"] == [2, 3, 3] and meta["architectures"] == [architecture]
    assert flowspeed("megatron-to-hf", tmp_path / "mg", tmp_path / "back").exit_code == 0
    assert _file_keys(tmp_path / "back") == _file_keys(src)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == architecture
    _assert_same(hf, back)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, back(input_ids=ids).logits)


def test_bad_inputs_are_refused_with_one_paragraph(tmp_path: Path) -> None:
    src = _saved(_hf_model("qwen2"), tmp_path / "hf")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    out = flowspeed("hf-to-megatron", src, taken, "--tp", "2")
    assert out.exit_code == 1 and "already exists and is not empty" in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    out = flowspeed("hf-to-megatron", src, tmp_path / "tp3", "--tp", "3")
    assert out.exit_code == 1 and "tensor parallel size 3 does not divide" in out.stderr
    assert "does not divide the query groups (num_key_value_heads) (2)" in out.stderr
    assert not (tmp_path / "tp3").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    empty = tmp_path / "empty"
    empty.mkdir()
    out = flowspeed("hf-to-megatron", empty, tmp_path / "x")
    assert out.exit_code == 1 and "has no config.json" in out.stderr

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = _saved(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), tmp_path / "gpt2")
    out = flowspeed("hf-to-megatron", gpt2, tmp_path / "z")  # DecoderShape.from_hf's own refusal
    assert out.exit_code == 1 and "decoders, not 'gpt2'" in out.stderr

    out = flowspeed("megatron-to-hf", src, tmp_path / "y")  # a HF folder is not a megatron one
    assert out.exit_code == 1 and "has no megatron.json" in out.stderr

    # --overwrite replaces a non-empty folder, whole
    out = flowspeed("hf-to-megatron", src, taken, "--tp", "2", "--overwrite")
    assert out.exit_code == 0, out.output
    assert not (taken / "keep.txt").exists() and (taken / "megatron.json").is_file()
