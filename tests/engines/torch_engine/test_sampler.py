import pytest
from flowspeed.engines.common.sampler import BucketBatchSampler

BUCKETS = ["a"] * 13 + ["b"] * 7 + ["c"] * 5


def _take(sampler: BucketBatchSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_every_batch_is_single_bucket_with_its_own_batch_size() -> None:
    sizes = {"a": 4, "b": 2, "c": 5}
    batches = _take(BucketBatchSampler(BUCKETS, sizes, seed=3), 40)  # several epochs
    for b in batches:
        (bucket,) = {BUCKETS[i] for i in b}
        assert len(b) == sizes[bucket]
    assert {BUCKETS[b[0]] for b in batches} == {"a", "b", "c"}


def test_resume_from_state_dict_continues_with_the_same_batches() -> None:
    straight = _take(BucketBatchSampler(BUCKETS, 2, seed=7), 25)
    first = BucketBatchSampler(BUCKETS, 2, seed=7)
    head = _take(first, 10)
    resumed = BucketBatchSampler(BUCKETS, 2, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + _take(resumed, 15) == straight
    assert _take(BucketBatchSampler(BUCKETS, 2, seed=8), 25) != straight  # the seed matters


def test_ranks_split_each_epoch_without_overlap() -> None:
    r0 = BucketBatchSampler(BUCKETS, 2, seed=1, rank=0, world=2)
    r1 = BucketBatchSampler(BUCKETS, 2, seed=1, rank=1, world=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 5  # 11 whole batches, 10 shared evenly
    e0 = [i for b in _take(r0, 5) for i in b]
    e1 = [i for b in _take(r1, 5) for i in b]
    assert not set(e0) & set(e1) and len(set(e0)) == len(e0) == 10


def test_resuming_with_another_world_size_continues_at_the_same_global_batch() -> None:
    one = BucketBatchSampler(BUCKETS, 2, seed=1, world=1)
    _take(one, 4)
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=1, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    # the single process's next two batches are what ranks 0 and 1 draw next
    assert [next(iter(r)) for r in ranks] == _take(one, 2)
    odd = BucketBatchSampler(BUCKETS, 2, seed=1, world=1)
    _take(odd, 3)
    with pytest.raises(ValueError, match="cannot split evenly"):
        BucketBatchSampler(BUCKETS, 2, seed=1, world=2).load_state_dict(odd.state_dict())
    with pytest.raises(ValueError, match="seed=1"):
        BucketBatchSampler(BUCKETS, 2, seed=2, world=1).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="no bucket has a full batch"):
        BucketBatchSampler(["a", "b"], 4)
