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
