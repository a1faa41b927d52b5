"""A distributed batch sampler whose every batch comes from one bucket.

Each epoch is planned from (seed, epoch) alone: shuffle within each bucket, cut into that bucket's
batch size (incomplete tails dropped), shuffle the batch order, deal batch i to rank i % world.
Micro-batch k of a rank is therefore a pure function of k, and the sampler's state is one counter:
`load_state_dict` puts a resumed run on exactly the batch an uninterrupted run would draw next.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch


class BucketBatchSampler:
    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int | dict[Hashable, int],
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.seed, self.rank, self.world = seed, rank, world
        self._by_bucket: dict[Hashable, list[int]] = defaultdict(list)
        for i, b in enumerate(buckets):
            self._by_bucket[b].append(i)
        self._order = sorted(self._by_bucket, key=repr)  # dict order must not depend on input order
        self._bs = batch_size
        self.consumed = 0  # micro-batches this rank has drawn
        self._plans: dict[int, list[list[int]]] = {}
        if self.batches_per_epoch == 0:
            sizes = {repr(b): (len(v), self._size(b)) for b, v in self._by_bucket.items()}
            raise ValueError(
                f"no bucket has a full batch for each of {world} ranks (bucket: (clips, batch size)) {sizes}; "
                "lower train.batch_size / the bucket batch sizes or add data"
            )

    def _size(self, bucket: Hashable) -> int:
        return self._bs[bucket] if isinstance(self._bs, dict) else self._bs

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches: list[list[int]] = []
            for b in self._order:
                idx = self._by_bucket[b]
                perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
                bs = self._size(b)
                batches += [perm[i : i + bs] for i in range(0, len(perm) - bs + 1, bs)]
            order = torch.randperm(len(batches), generator=g).tolist()
            usable = len(batches) - len(batches) % self.world  # every rank gets as many batches
            self._plans = {epoch: [batches[order[i]] for i in range(usable)]}  # keep one epoch in memory
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        total = sum(len(v) // self._size(b) for b, v in self._by_bucket.items())
        return total // self.world

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        return self._plan(epoch)[j * self.world + self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            out = self.batch(self.consumed)
            self.consumed += 1
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved sampler stopped. Another data-parallel size continues at the same
        global batch (batches are dealt round-robin), which is exact within the epoch."""
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's sample order was made with seed={state['seed']}; this run has "
                f"seed={self.seed}: keep train.seed to resume"
            )
        drawn = int(state["consumed"]) * int(state["world"])  # global micro-batches drawn
        if drawn % self.world:
            raise ValueError(
                f"the checkpoint stopped after {drawn} global micro-batches, which {self.world} data-parallel "
                f"ranks cannot split evenly; resume with a data-parallel size that divides {drawn}"
            )
        self.consumed = drawn // self.world


class TokenBudgetBatchSampler:
    """Micro-batches formed by a token budget instead of a sample count, for packed training.

    VLM samples run from a few hundred to tens of thousands of tokens: a fixed sample count either wastes
    most of a padded batch or overflows memory on a long one. Each epoch is planned from (seed, epoch)
    alone: the samples are shuffled, then laid into micro-batches in that order, a new one opened when the
    next sample would overflow `max_tokens` (or `max_vision_tokens` of vision-encoder input), and the
    micro-batches are dealt round-robin to the ranks (the tail that does not fill every rank is dropped).
    Micro-batch k of a rank is a pure function of k, so the state is one counter, as in BucketBatchSampler,
    and a resumed run draws exactly what the uninterrupted one would.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        vision_lengths: Sequence[int] | None = None,
        max_vision_tokens: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.vision = [int(n) for n in vision_lengths] if vision_lengths is not None else [0] * len(self.lengths)
        self.max_tokens, self.max_vision = int(max_tokens), max_vision_tokens
        self.seed, self.rank, self.world = seed, rank, world
        self.consumed = 0
        too_long = [i for i, n in enumerate(self.lengths) if n > self.max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} of {len(self.lengths)} samples are longer than train.packing.max_tokens="
                f"{self.max_tokens} (the longest is {max(self.lengths)} tokens): raise the budget to at least the "
                "longest sample, or lower model.max_text_length and prep again"
            )
        if max_vision_tokens is not None:
            wide = [n for n in self.vision if n > max_vision_tokens]
            if wide:
                raise ValueError(
                    f"{len(wide)} samples have more vision patches than train.packing.max_vision_tokens="
                    f"{max_vision_tokens} (the most is {max(wide)}): raise it, or lower the media resolution and prep "
                    "again"
                )
        self._plans: dict[int, list[list[int]]] = {}
        self._epoch_sizes: list[int] = []  # micro-batches per rank of epochs 0, 1, ... as planned so far
        if self._per_rank(0) == 0:
            raise ValueError(
                f"{len(self.lengths)} samples fill fewer token-budget micro-batches than the {world} data-parallel "
                "ranks: lower train.packing.max_tokens or add data"
            )

    def _plan(self, epoch: int) -> list[list[int]]:
        """This epoch's micro-batches, every rank's, in dealing order."""
        if epoch not in self._plans:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches: list[list[int]] = []
            current: list[int] = []
            tokens = vision = 0
            for i in torch.randperm(len(self.lengths), generator=g).tolist():
                over = tokens + self.lengths[i] > self.max_tokens or (
                    self.max_vision is not None and vision + self.vision[i] > self.max_vision
                )
                if current and over:
                    batches.append(current)
                    current, tokens, vision = [], 0, 0
                current.append(i)
                tokens += self.lengths[i]
                vision += self.vision[i]
            if current:
                batches.append(current)
            usable = len(batches) - len(batches) % self.world
            self._plans = {epoch: batches[:usable]}  # keep one epoch in memory
        return self._plans[epoch]

    def _per_rank(self, epoch: int) -> int:
        while len(self._epoch_sizes) <= epoch:
            self._epoch_sizes.append(len(self._plan(len(self._epoch_sizes))) // self.world)
        return self._epoch_sizes[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in the first epoch (later epochs' shuffles can pack a few more or fewer)."""
        return self._per_rank(0)

    def batch(self, k: int) -> list[int]:
        epoch = 0
        while k >= self._per_rank(epoch):
            k -= self._per_rank(epoch)
            epoch += 1
        return self._plan(epoch)[k * self.world + self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            out = self.batch(self.consumed)
            self.consumed += 1
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "world": self.world, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved sampler stopped; the budget and the data-parallel size are part of the plan."""
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's sample order was made with seed={state['seed']}; this run has "
                f"seed={self.seed}: keep train.seed to resume"
            )
        if state.get("max_tokens") != self.max_tokens or int(state["world"]) != self.world:
            raise ValueError(
                f"the checkpoint packed micro-batches of max_tokens={state.get('max_tokens')} over {state['world']} "
                f"data-parallel ranks; this run has max_tokens={self.max_tokens} over {self.world}: the token-budget "
                "plan differs, so the data position cannot be carried over; keep both to resume"
            )
        self.consumed = int(state["consumed"])
