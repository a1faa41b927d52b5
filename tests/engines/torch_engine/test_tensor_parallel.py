"""Tensor (and sequence) parallelism on 2 real gloo CPU ranks: 5 AdamW steps with gradient clipping match
one process within 1e-5 per step, and the final full weights match.

One spawn checks every case: each rank trains a single-process reference and a TP=2 model built from the same
seed on the same inputs, and also records the error cases; the parent compares what the ranks return.
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.torch_engine.tensor_parallel import apply_tp, supported_tp_models
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.distributed import run_ranks

TOL = 1e-5
WEIGHT_TOL = 2e-5  # Adam divides by sqrt(v): fp32 reduction-order noise in tiny grads moves weights a little more
STEPS = 5


def _cogvideox(heads: int = 2) -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel
    from flowspeed.engines.models.cogvideox import TRANSFORMER_PRESETS

    torch.manual_seed(0)
    preset = dict(TRANSFORMER_PRESETS["tiny"], num_attention_heads=heads)
    return CogVideoXTransformer3DModel(in_channels=4, out_channels=4, text_embed_dim=32, max_text_seq_length=8,
                                       use_rotary_positional_embeddings=True, **preset)  # fmt: skip


def _causal_lm(kind: str, heads: int = 4, kv_heads: int = 2, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=128, hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                     tie_word_embeddings=tie)  # fmt: skip
    return model_cls(cfg)


def _cogvideox_losses(text_len: int = 8):
    """The family's own training loss, untouched: TP must be invisible to it."""
    from diffusers import CogVideoXDDIMScheduler
    from flowspeed.engines.models.cogvideox import SCHEDULER_CONFIG, CogVideoX

    family, scheduler = CogVideoX(), CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(1)
    batch = {
        "latent_params": torch.randn(2, 8, 3, 8, 8, generator=g),  # (B, 2*Cz, T', H', W'): 3*4*4 = 48 video tokens
        "text_embeds": torch.randn(2, text_len, 32, generator=g),  # (B, L, D)
        "scaling_factor": torch.ones(2),
    }
    return lambda model, step: family.training_loss(model, scheduler, batch, torch.Generator().manual_seed(step))


def _lm_losses():
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))  # (B, S)
    return lambda model, step: model(input_ids=ids, labels=ids).loss


def _train(model: nn.Module, loss_of) -> list[tuple[float, float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for step in range(STEPS):
        loss = loss_of(model, step)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # clips, since grad norms are ~1-4
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item(), norm.item()))
    return out


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


CASES = {  # name: (builder, loss factory, sequence_parallel)
    "cogvideox": (_cogvideox, _cogvideox_losses, False),
    "cogvideox_sp": (_cogvideox, _cogvideox_losses, True),
    "qwen2": (lambda: _causal_lm("qwen2"), _lm_losses, False),
    "qwen2_sp": (lambda: _causal_lm("qwen2"), _lm_losses, True),
    "llama_tied_sp": (lambda: _causal_lm("llama", tie=True), _lm_losses, True),
}


def _worker(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    results = {}
    for name, (build, losses, sp) in CASES.items():
        ref, tp = build(), build()
        apply_tp(tp, mesh, sequence_parallel=sp)
        results[name] = dict(
            all_dtensor=all(isinstance(p, DTensor) for p in tp.parameters()),
            tied=name.endswith("tied_sp") and tp.lm_head.weight is tp.model.embed_tokens.weight,
            ref=_train(ref, losses()),
            tp=_train(tp, losses()),
            ref_state=ref.state_dict(),
            tp_state=_full_state(tp),
        )

    def uneven_sp():  # 7 text tokens cannot be split in 2
        model = _cogvideox()
        apply_tp(model, mesh, sequence_parallel=True)
        _cogvideox_losses(text_len=7)(model, 0)

    results["errors"] = dict(
        unsupported=_error(lambda: apply_tp(nn.Linear(4, 4), mesh)),
        heads=_error(lambda: apply_tp(_causal_lm("qwen2", heads=3, kv_heads=3), mesh)),
        kv_heads=_error(lambda: apply_tp(_causal_lm("llama", heads=4, kv_heads=1), mesh)),
        dit_heads=_error(lambda: apply_tp(_cogvideox(heads=3), mesh)),
        uneven_sp=_error(uneven_sp),
    )
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_worker, 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp_training_matches_single_process(ranks: list[dict], case: str) -> None:
    for r in ranks:
        res = r[case]
        assert res["all_dtensor"], "every parameter is a DTensor, so clip_grad_norm_/AdamW see one kind"
        for (ref_loss, ref_norm), (tp_loss, tp_norm) in zip(res["ref"], res["tp"], strict=True):
            assert abs(ref_loss - tp_loss) < TOL, (res["ref"], res["tp"])
            assert abs(ref_norm - tp_norm) < TOL, "clip_grad_norm_ over DTensor shards: same total norm"
        for k, v in res["ref_state"].items():
            torch.testing.assert_close(res["tp_state"][k], v, rtol=0, atol=WEIGHT_TOL, msg=k)
    if case.endswith("tied_sp"):
        assert ranks[0][case]["tied"], "tied embeddings stay one (sharded) parameter"


@pytest.mark.slow
def test_tp_errors(ranks: list[dict]) -> None:
    errors = ranks[0]["errors"]
    assert "no tensor-parallel plan for Linear" in errors["unsupported"]
    for name in supported_tp_models():
        assert name in errors["unsupported"]
    assert "3 attention heads" in errors["heads"] and "tp=2" in errors["heads"]
    assert "1 key/value heads" in errors["kv_heads"] and "tp=2" in errors["kv_heads"]
    assert "CogVideoXTransformer3DModel has 3 attention heads" in errors["dit_heads"]
    assert "encoder_hidden_states of 7 tokens" in errors["uneven_sp"] and "sequence_parallel" in errors["uneven_sp"]


def test_supported_models() -> None:
    assert {"CogVideoXTransformer3DModel", "Qwen2ForCausalLM", "LlamaForCausalLM"} <= set(supported_tp_models())
