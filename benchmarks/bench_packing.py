"""Padded vs packed training of a tiny VLM on a mix of short and long samples: real tokens per second.

    python benchmarks/bench_packing.py                      # tiny Qwen2-VL, 48 samples, 3 rounds
    python benchmarks/bench_packing.py --max-tokens 1536 --rounds 5

Side by side in one process, on the same encoded samples in the same shuffled order, with the same model
and optimizer step (the torch engine's token loss, normalised over each step's labelled tokens):
  padded : micro-batches of --batch-size samples, right-padded to the longest (what a trainer without
           packing computes)
  packed : micro-batches cut by the token budget (TokenBudgetBatchSampler, --max-tokens), the samples end to
           end in one row with attention kept inside each sample (the engine's train.packing path)
Both sides see every sample once per round; real (non-pad) tokens per second and the padding ratio are printed,
rounds alternate the two sides, the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from flowspeed.configs import ComponentConfig, ModelConfig
from flowspeed.engines.common.sampler import TokenBudgetBatchSampler
from flowspeed.engines.models import get_family
from flowspeed.engines.models.sequence import SequenceSample


def samples(n: int, long_every: int, seed: int = 0) -> list[SequenceSample]:
    """Short chats about an image (~70 tokens) and, every `long_every`-th, a long answer (~1,000-1,500 tokens):
    the spread of real VLM data, where a few long samples set the padded batch's length."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
        if i % long_every == 0:
            answer = " ".join(f"step {k}: the object moves right." for k in range(int(rng.integers(30, 45))))
        else:
            answer = "A red circle." * int(rng.integers(1, 4))
        messages = [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": answer}]
        out.append(SequenceSample(messages=messages, images=[image]))
    return out


def run(fam: Any, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], opt: torch.optim.Optimizer) -> float:
    """One pass over the batches, one optimizer step per micro-batch; seconds."""
    t0 = time.perf_counter()
    gen = torch.Generator()
    for batch in batches:
        batch = {**batch, "loss_normalizer": float(fam.loss_targets(batch))}
        fam.training_loss(model, None, batch, gen).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--long-every", type=int, default=6, help="one long sample in this many")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per padded micro-batch")
    ap.add_argument("--max-tokens", type=int, default=2048, help="token budget per packed micro-batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fam = get_family("qwen2_vl")
    cfg = ModelConfig(family="qwen2_vl", transformer=ComponentConfig(preset="tiny"), max_text_length=4096)
    processor = fam.load_processor(cfg)
    items = [fam.encode_sample(processor, s, 4096) for s in samples(args.samples, args.long_every)]
    lengths = [len(it["input_ids"]) for it in items]

    model = fam.load_model(cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    padded = [
        fam.collate([items[i] for i in order[k : k + args.batch_size]]) for k in range(0, len(order), args.batch_size)
    ]
    sampler = TokenBudgetBatchSampler(lengths, args.max_tokens, seed=0)
    packed = [fam.pack([items[i] for i in sampler.batch(k)]) for k in range(sampler.batches_per_epoch)]
    real = sum(lengths)
    slots = {"padded": sum(fam.token_slots(b) for b in padded), "packed": sum(fam.token_slots(b) for b in packed)}
    covered = sum(len(sampler.batch(k)) for k in range(sampler.batches_per_epoch))
    assert covered == len(items), "the packed epoch must cover every sample"
    print(
        f"{len(items)} samples, {real} real tokens (shortest {min(lengths)}, longest {max(lengths)}); "
        f"padded: {len(padded)} micro-batches of {args.batch_size}; packed: {len(packed)} micro-batches of at most "
        f"{args.max_tokens} tokens; tiny Qwen2-VL, {args.threads} threads"
    )
    run(fam, model, padded[:1], opt)  # warm-up
    run(fam, model, packed[:1], opt)
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.rounds):
        times["padded"].append(run(fam, model, padded, opt))
        times["packed"].append(run(fam, model, packed, opt))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("padded", "packed"):
        print(
            f"{k:7s}: {real / med[k]:9.1f} real tokens/s ({med[k]:.2f} s per epoch; padding ratio "
            f"{1 - real / slots[k]:.3f}, {slots[k]} positions computed)"
        )
    print(f"ratio packed / padded real tokens/s: {med['padded'] / med['packed']:.2f}x")


if __name__ == "__main__":
    main()
