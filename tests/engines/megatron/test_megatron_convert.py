"""HF Llama / Qwen2 <-> megatron-core GPTModel: logits parity on 1 and 2 tensor-parallel gloo ranks, and
the way back to HF equal to the original state dict."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flowspeed.engines.megatron.convert import hf_to_megatron, megatron_to_hf
from flowspeed.engines.megatron.gpt import DecoderShape

from tests.distributed import run_ranks


def _hf_model(kind: str, layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)  # fmt: skip
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _megatron_logits(rank: int, world: int, kind: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from flowspeed.engines.megatron.gpt import build_gpt, transformer_config
    from flowspeed.engines.megatron.setup import init_model_parallel

    hf = _hf_model(kind)
    shape = DecoderShape.from_hf(hf.config)
    init_model_parallel(tp=world)
    model = build_gpt(shape, transformer_config(shape, tensor_model_parallel_size=world), parallel_output=False)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf.state_dict(), shape, tp=world, tp_rank=rank),
                                                strict=False)  # fmt: skip
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=None)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return logits, state


KINDS = ("qwen2", "llama")


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _every_kind(rank: int, world: int) -> dict[str, tuple[torch.Tensor, dict]]:
    """Both decoders in one set of ranks (megatron's parallel state torn down in between): one spawn per TP size."""
    from megatron.core import parallel_state as ps

    out = {}
    for kind in KINDS:
        out[kind] = _megatron_logits(rank, world, kind, _ids())
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def megatron_ranks() -> Callable[[int], list[dict[str, tuple[torch.Tensor, dict]]]]:
    """Each TP size's ranks, spawned once for the module and shared by the tests of both decoders."""
    spawned: dict[int, list] = {}

    def ranks(tp: int) -> list[dict[str, tuple[torch.Tensor, dict]]]:
        if tp not in spawned:
            spawned[tp] = run_ranks(_every_kind, tp)
        return spawned[tp]

    return ranks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [1, 2])
def test_converted_model_gives_the_hf_logits_and_converts_back(
    kind: str, tp: int, megatron_ranks: Callable[[int], list[dict[str, tuple[torch.Tensor, dict]]]]
) -> None:
    hf = _hf_model(kind)
    with torch.no_grad():
        expected = hf(_ids()).logits
    results = [per_kind[kind] for per_kind in megatron_ranks(tp)]
    for logits, _ in results:
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # the megatron model's own state dicts (one per TP rank) back to HF: equal to the original
    back = megatron_to_hf([[state for _, state in results]], DecoderShape.from_hf(hf.config))
    original = {
        k: v for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")
    }
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (2, 4)])
def test_resplitting_round_trips_byte_for_byte(tp: int, pp: int) -> None:
    hf = _hf_model("qwen2", layers=4)
    shape = DecoderShape.from_hf(hf.config)
    state = hf.state_dict()
    shards = [[hf_to_megatron(state, shape, tp, t, pp, p) for t in range(tp)] for p in range(pp)]
    assert "output_layer.weight" not in shards[0][0] and "embedding.word_embeddings.weight" not in shards[-1][0]
    layers = {k.split(".")[2] for k in shards[-1][0] if k.startswith("decoder.layers.")}
    assert layers == {str(i) for i in range(4 // pp)}  # each stage numbers its own layers from 0
    back = megatron_to_hf(shards, shape)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_impossible_layouts_and_unknown_models_are_refused() -> None:
    hf = _hf_model("qwen2")
    shape = DecoderShape.from_hf(hf.config)
    with pytest.raises(ValueError, match="does not divide the query groups"):
        hf_to_megatron(hf.state_dict(), shape, tp=4)
    with pytest.raises(ValueError, match="pipeline parallel size 3"):
        hf_to_megatron(hf.state_dict(), shape, pp=3)
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="converts llama, qwen2, mistral, qwen2_vl, qwen2_5_vl decoders, not 'gpt2'"):
        DecoderShape.from_hf(GPT2Config())
