"""Sequence packing on the torch engine: the token-budget sampler, and packed == padded on the same samples.

Packed rows keep attention inside each sample (position ids that restart, from which transformers builds a
block-diagonal mask on CPU) and the loss is a per-token mean over the whole global batch, so the same samples
give the same loss and gradients whether they come padded in one batch, packed in one row, or packed in several
micro-batches over two ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs import ModelConfig, PipelineConfig
from flowspeed.configs.validate import config_problems
from flowspeed.engines.common.sampler import TokenBudgetBatchSampler
from flowspeed.engines.models.registry import get_family
from flowspeed.engines.models.sequence import SequenceSample

from tests.distributed import run_ranks

# packed == padded in one process for these VLM families (each new family checks its own too); the 2-rank engine
# step for the M-RoPE ones (one spawn; GLM-4.1V with an image and a video in one sample)
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "internvl"]
ENGINE_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "glm4v"]
TOL = 1e-5


def _chat(question: str, answer: str, **media: list[np.ndarray]) -> SequenceSample:
    return SequenceSample([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **media)


def _samples() -> list[SequenceSample]:
    """Images, videos, both and neither; lengths from ~70 to ~100 tokens."""
    rng = np.random.default_rng(0)

    def pixels(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, shape, dtype=np.uint8)

    return [
        _chat("What is it?", "A red circle in the corner.", images=[pixels(40, 50, 3)]),
        _chat("Does it move?", "Yes.", videos=[pixels(4, 30, 30, 3)]),
        _chat("Say hello to everyone here, please.", "hello"),
        _chat("Both?", "An image, then a clip.", images=[pixels(56, 56, 3)], videos=[pixels(2, 28, 56, 3)]),
        _chat("Left or right?", "Left, near the top.", images=[pixels(28, 28, 3)]),
        _chat("Count the frames.", "Four of them.", videos=[pixels(4, 28, 28, 3)]),
    ]


def _encoded(family: str) -> list[dict[str, torch.Tensor]]:
    """The samples through the family's processor; videos left out for image-only families (LLaVA)."""
    fam = get_family(family)
    cfg = ModelConfig(family=family, max_text_length=1024)
    processor = fam.load_processor(cfg)
    samples = [s for s in _samples() if "video" in fam.media or not s.videos]
    return [fam.encode_sample(processor, s, 1024) for s in samples]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# ---- the token-budget sampler ---------------------------------------------------------------------------
LENGTHS = [int(n) for n in np.random.default_rng(3).integers(20, 400, 97)]


def test_budget_batches_cover_every_sample_once_per_epoch_and_never_overflow() -> None:
    s = TokenBudgetBatchSampler(LENGTHS, 600, seed=5)
    epoch = [s.batch(k) for k in range(s.batches_per_epoch)]
    assert all(sum(LENGTHS[i] for i in b) <= 600 for b in epoch)
    assert sorted(i for b in epoch for i in b) == list(range(len(LENGTHS)))
    nxt = [s.batch(s.batches_per_epoch + k) for k in range(3)]
    assert nxt != epoch[:3]  # the next epoch is shuffled anew
    # vision budgets cap the encoder's input too
    vision = [n // 3 for n in LENGTHS]
    v = TokenBudgetBatchSampler(LENGTHS, 600, vision_lengths=vision, max_vision_tokens=150, seed=5)
    assert all(sum(vision[i] for i in v.batch(k)) <= 150 for k in range(v.batches_per_epoch))


def test_two_ranks_split_an_epoch_and_resume_repeats_the_uninterrupted_order() -> None:
    r0, r1 = (TokenBudgetBatchSampler(LENGTHS, 600, seed=5, rank=r, world=2) for r in (0, 1))
    seen = [i for k in range(r0.batches_per_epoch) for s in (r0, r1) for i in s.batch(k)]
    assert len(seen) == len(set(seen)) and len(seen) >= len(LENGTHS) - 3  # disjoint; only a short tail dropped

    straight = iter(TokenBudgetBatchSampler(LENGTHS, 600, seed=5, rank=1, world=2))
    want = [next(straight) for _ in range(2 * r1.batches_per_epoch + 3)]  # across two epoch boundaries
    first = TokenBudgetBatchSampler(LENGTHS, 600, seed=5, rank=1, world=2)
    it = iter(first)
    got = [next(it) for _ in range(r1.batches_per_epoch // 2)]
    resumed = TokenBudgetBatchSampler(LENGTHS, 600, seed=5, rank=1, world=2)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    got += [next(it) for _ in range(len(want) - len(got))]
    assert got == want


def test_budget_refusals_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"longer than train.packing.max_tokens=300 \(the longest is 399"):
        TokenBudgetBatchSampler([*LENGTHS, 399], 300)
    s = TokenBudgetBatchSampler(LENGTHS, 600, seed=5)
    with pytest.raises(ValueError, match="max_tokens=600 over 1.*max_tokens=700 over 1"):
        TokenBudgetBatchSampler(LENGTHS, 700, seed=5).load_state_dict(s.state_dict())
    wrong = PipelineConfig.model_validate({"model": {"family": "sd3"}, "train": {"packing": {"max_tokens": 512}}})
    assert any("train.packing.max_tokens is set, but sd3" in p for p in config_problems(wrong))
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_family("whisper").pack([{"input_features": torch.zeros(80, 3000), "labels": torch.ones(4)}])


# ---- packed == padded ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_the_padded_batch_in_loss_and_gradients(family: str) -> None:
    fam = get_family(family)
    items = _encoded(family)
    model = fam.load_model(ModelConfig(family=family)).train()
    gen = torch.Generator()

    padded = fam.collate(items)
    assert (padded["attention_mask"] == 0).any()  # the samples differ in length: padding happened
    fam.training_loss(model, None, padded, gen).backward()
    want_loss = float(fam.training_loss(model, None, padded, gen))
    want = _grads(model)

    packed = fam.pack(items)
    assert packed["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    assert fam.token_slots(packed) == sum(len(it["input_ids"]) for it in items) < fam.token_slots(padded)
    assert fam.loss_targets(packed) == fam.loss_targets(padded)  # a sample's first label is never a target
    model.zero_grad()
    loss = fam.training_loss(model, None, packed, gen)
    loss.backward()
    assert abs(float(loss) - want_loss) < TOL and _max_diff(_grads(model), want) < TOL

    # the same samples as three packed micro-batches, each normalised by the step's labelled tokens
    model.zero_grad()
    total = 0.0
    for part in (items[:1], items[1:-1], items[-1:]):
        batch = {**fam.pack(part), "loss_normalizer": float(fam.loss_targets(padded))}
        loss = fam.training_loss(model, None, batch, gen)
        loss.backward()
        total += float(loss)
    assert abs(total - want_loss) < TOL and _max_diff(_grads(model), want) < TOL


def _engine_steps(rank: int, world: int, workdir: str, encoded: dict[str, list[dict]]) -> dict[str, dict]:
    """The torch engine's own step (FSDP2 over 2 gloo ranks) on packed micro-batches, for each family: the rank's
    share of the samples, two micro-batches each (grad_accum 2). Returns each step's loss and full gradients."""
    from flowspeed.engines.torch_engine.setup import full_value
    from flowspeed.engines.torch_engine.trainer import TorchBackend

    out = {}
    for family, items in encoded.items():
        cfg = PipelineConfig.model_validate(
            {"workdir": workdir, "model": {"family": family},
             "train": {"nproc_per_node": world, "grad_accum": 2, "packing": {"max_tokens": 4096}}}
        )  # fmt: skip
        records = [{"shapes": {k: list(v.shape) for k, v in it.items()}, "num_frames": 1} for it in items]
        backend = TorchBackend(cfg)
        backend.init()
        backend.build(records, items)
        # rank 0 draws sample [2] (text only: its vision tower still runs, on a blank image, times 0), then [0, 1];
        # rank 1 draws [3, 4], then [5]: uneven token counts per rank
        drawn = [[[2], [0, 1]], [[3, 4], [5]]][rank]
        step = backend.forward_backward(0, iter(drawn))
        grads = {
            n: full_value(p.grad).detach().clone() for n, p in backend.core.named_parameters() if p.grad is not None
        }
        out[family] = {"loss": step.loss, "grads": grads, "tokens": step.tokens, "slots": step.slots}
    return out


def test_packed_step_on_two_ranks_equals_one_padded_process(tmp_path: Path) -> None:
    encoded = {family: _encoded(family) for family in ENGINE_FAMILIES}
    results = run_ranks(_engine_steps, 2, str(tmp_path), encoded)
    for family, items in encoded.items():
        fam = get_family(family)
        model = fam.load_model(ModelConfig(family=family)).train()
        fam.set_trainable(model, ModelConfig(family=family))
        padded = fam.collate(items)
        loss = fam.training_loss(model, None, padded, torch.Generator())
        loss.backward()
        want = _grads(model)
        n_tokens = sum(len(it["input_ids"]) for it in items)
        for r in results:
            got = r[family]
            assert abs(got["loss"] - float(loss)) < TOL, family
            assert got["tokens"] == got["slots"] == n_tokens  # every sample counted once, no pad computed
            assert _max_diff(got["grads"], want) < TOL, family
