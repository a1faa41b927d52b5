"""Pipeline parallelism on 2 real gloo CPU ranks: 1F1B (2 stages) and interleaved 1F1B (4 stages, 2 per rank)
train a 4-layer Qwen2 for 5 AdamW steps with cross-stage gradient clipping; per-step losses match one process
within 1e-5 and the final weights match.

The labels carry padding (-100) unevenly across sequences, so the micro-batches hold different token counts:
the runner's re-weighting must still give the full-batch mean. One spawn checks both schedules and the errors.
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.torch_engine.pipeline_parallel import build_pipeline, causal_lm_loss
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed import run_ranks

TOL = 1e-5
WEIGHT_TOL = 2e-5
STEPS = 5
SCHEDULES = {"1f1b": (1, 2), "interleaved_1f1b": (2, 4)}  # schedule: (virtual_stages, n_microbatches)


def _qwen2(layers: int = 4, tie: bool = False) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))  # (B, S)
    labels = ids.clone()
    labels[0, 10:] = -100  # padding: 9, 15, 15 and 4 label tokens per sequence
    labels[3, 5:] = -100
    return ids, labels


def _reference() -> tuple[list[tuple[float, float, float]], dict]:
    model, (ids, labels) = _qwen2(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(STEPS):
        res = model(input_ids=ids, labels=labels)
        ours = causal_lm_loss(res.logits, labels)  # must equal transformers' own loss
        res.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((res.loss.item(), ours.item(), norm.item()))
    return out, model.state_dict()


def _pipelined(mesh, schedule: str) -> tuple[list, dict]:
    virtual, n_mb = SCHEDULES[schedule]
    runner = build_pipeline(_qwen2(), mesh, schedule=schedule, n_microbatches=n_mb, virtual_stages=virtual,
                            loss_fn=causal_lm_loss)  # fmt: skip
    ids, labels = _batch()
    opt = torch.optim.AdamW([p for m in runner.modules for p in m.parameters()], lr=1e-3)
    out = []
    for _ in range(STEPS):
        loss = runner.step(ids, labels)
        norm = runner.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((None if loss is None else loss.item(), norm.item()))
    state = {k: v for m in runner.modules for k, v in m.state_dict().items()}
    return out, {"stages": [s.stage_index for s in runner.stages], "state": state}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    results = {"reference": _reference()}
    for schedule in SCHEDULES:
        results[schedule] = _pipelined(mesh, schedule)

    def build(**kw):
        kw = dict(schedule="1f1b", n_microbatches=2) | kw
        return lambda: build_pipeline(kw.pop("model", None) or _qwen2(), mesh, **kw)

    ids, labels = _batch()
    results["errors"] = dict(
        schedule=_error(build(schedule="gpipe")),
        interleaved_v1=_error(build(schedule="interleaved_1f1b", virtual_stages=1)),
        f1b_v2=_error(build(virtual_stages=2)),
        layers=_error(build(schedule="interleaved_1f1b", virtual_stages=3)),  # 4 layers, 6 stages
        tied=_error(build(model=_qwen2(tie=True))),
        unsupported=_error(build(model=nn.Linear(2, 2))),
        batch=_error(lambda: build_pipeline(_qwen2(), mesh, n_microbatches=3).step(ids, labels)),
    )
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_worker, 2)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pipeline_matches_single_process(ranks: list[dict], schedule: str) -> None:
    ref, ref_state = ranks[0]["reference"]
    for hf_loss, our_loss, _ in ref:
        assert abs(hf_loss - our_loss) < 1e-6, "causal_lm_loss is transformers' shifted-label mean"
    first, last = ranks[0][schedule], ranks[1][schedule]
    virtual = SCHEDULES[schedule][0]
    assert first[1]["stages"] == list(range(0, 2 * virtual, 2)) and last[1]["stages"] == list(range(1, 2 * virtual, 2))
    assert all(loss is None for loss, _ in first[0]), "only the last stage's rank has a loss"
    for (hf_loss, _, ref_norm), (loss, norm), (_, norm0) in zip(ref, last[0], first[0], strict=True):
        assert abs(hf_loss - loss) < TOL, (ref, last[0])
        assert abs(ref_norm - norm) < TOL and abs(ref_norm - norm0) < TOL, "grad norm over all stages"
    merged = first[1]["state"] | last[1]["state"]
    assert set(merged) == set(ref_state), "stage state-dict keys are the whole model's"
    assert "model.embed_tokens.weight" in first[1]["state"] and "lm_head.weight" in last[1]["state"]
    for k, v in ref_state.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=WEIGHT_TOL, msg=k)


@pytest.mark.slow
def test_pipeline_errors(ranks: list[dict]) -> None:
    e = ranks[0]["errors"]
    assert "unknown pipeline schedule 'gpipe'" in e["schedule"] and "interleaved_1f1b" in e["schedule"]
    assert "needs virtual_stages >= 2" in e["interleaved_v1"]
    assert "one stage per rank" in e["f1b_v2"]
    assert "4 decoder layers do not split evenly" in e["layers"] and "6 stages" in e["layers"]
    assert "untie them first" in e["tied"]
    assert "Qwen2ForCausalLM" in e["unsupported"] and "Linear" in e["unsupported"]
    assert "batch of 4 sequences" in e["batch"] and "n_microbatches=3" in e["batch"]
