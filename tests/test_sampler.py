"""BucketBatchSampler: one bucket per batch, seeded, sharded across ranks, resumable mid-epoch."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter

import pytest

from pixart_tune.data.sampler import BucketBatchSampler

# 23 samples: bucket "a" has 10, "b" 9, "c" 3, "d" 1, interleaved as a real dataset would be.
BUCKETS = list(itertools.islice(itertools.cycle(["a", "b", "a", "b", "c", "a", "b"]), 22)) + ["d"]
COUNTS = Counter(BUCKETS)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_bucket_fixture():
    assert COUNTS == {"a": 10, "b": 9, "c": 3, "d": 1}


def test_every_batch_is_one_bucket_and_full():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(math.ceil(n / 4) for n in COUNTS.values()) == 8
    for batch in batches:
        assert len(batch) == 4 and len({BUCKETS[i] for i in batch}) == 1
    assert set(itertools.chain(*batches)) == set(range(len(BUCKETS)))  # nothing dropped


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    first = BucketBatchSampler(BUCKETS, 4, seed=7).epoch_batches(0)
    assert first == BucketBatchSampler(BUCKETS, 4, seed=7).epoch_batches(0)
    assert first != BucketBatchSampler(BUCKETS, 4, seed=8).epoch_batches(0)
    assert first != BucketBatchSampler(BUCKETS, 4, seed=7).epoch_batches(1)


def test_set_epoch_restarts_with_that_epochs_plan():
    sampler = BucketBatchSampler(BUCKETS, 2, seed=3)
    take(iter(sampler), 3)
    sampler.set_epoch(5)
    assert list(sampler) == sampler.epoch_batches(5)


def test_small_bucket_is_filled_with_its_own_samples():
    batches = BucketBatchSampler(BUCKETS, 4, seed=0).epoch_batches(0)
    d_index = BUCKETS.index("d")
    assert [d_index] * 4 in batches  # the 1-sample bucket is repeated, not dropped
    c_batch = next(b for b in batches if BUCKETS[b[0]] == "c")
    assert Counter(c_batch).most_common(1)[0][1] == 2 and set(c_batch) == {i for i, k in enumerate(BUCKETS) if k == "c"}


def test_drop_last_drops_incomplete_batches_and_counts_them():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0, drop_last=True)
    batches = sampler.epoch_batches(0)
    assert len(batches) == 10 // 4 + 9 // 4 == 4
    assert {BUCKETS[b[0]] for b in batches} == {"a", "b"}
    assert sampler.dropped_per_epoch == 2 + 1 + 3 + 1
    assert all(len(set(b)) == 4 for b in batches)  # no repeats with drop_last


def test_ranks_split_each_global_batch():
    world = 3
    samplers = [BucketBatchSampler(BUCKETS, 2, seed=1, rank=r, world_size=world) for r in range(world)]
    per_rank = [s.epoch_batches(0) for s in samplers]
    global_batches = samplers[0].global_batches(0)
    assert all(len(batches) == len(global_batches) for batches in per_rank)
    for step, global_batch in enumerate(global_batches):
        parts = [per_rank[r][step] for r in range(world)]
        assert list(itertools.chain(*parts)) == global_batch  # together: exactly the global batch
        assert len({BUCKETS[i] for i in global_batch}) == 1  # all ranks in the same bucket this step
    # Disjoint whenever the bucket fills the global batch without repeats (bucket "a": 10 >= 6).
    first_a = next(g for g in global_batches if BUCKETS[g[0]] == "a")
    assert len(set(first_a)) == 6


def test_resume_mid_epoch_gives_the_same_remaining_batches():
    uninterrupted = take(BucketBatchSampler(BUCKETS, 2, seed=11).forever(), 30)  # crosses 2 epoch ends
    first = BucketBatchSampler(BUCKETS, 2, seed=11)
    seen = take(first.forever(), 17)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 17 - len(first)
    resumed = BucketBatchSampler(BUCKETS, 2, seed=11)
    resumed.load_state_dict(state)
    assert seen + take(resumed.forever(), 13) == uninterrupted


def test_resume_under_another_plan_goes_on_from_the_next_epoch():
    first = BucketBatchSampler(BUCKETS, 2, seed=11)
    take(first.forever(), len(first) + 3)  # 3 batches into epoch 1
    state = first.state_dict()
    for changed, sampler in [("batch_size 2 -> 4", BucketBatchSampler(BUCKETS, 4, seed=11)),
                             ("world_size 1 -> 2", BucketBatchSampler(BUCKETS, 2, seed=11, rank=1, world_size=2)),
                             ("buckets_digest", BucketBatchSampler(BUCKETS[::-1], 2, seed=11))]:  # fmt: skip
        with pytest.warns(UserWarning, match=rf"{changed}.*start of epoch 2.*first 3 batches"):
            sampler.load_state_dict(state)
        assert (sampler.epoch, sampler.batches_consumed) == (2, 0)
        assert next(iter(sampler)) == sampler.epoch_batches(2)[0]
    # Saved at an epoch's start, nothing is skipped and nothing is said.
    at_start = BucketBatchSampler(BUCKETS, 2, seed=11)
    at_start.set_epoch(1)
    sampler = BucketBatchSampler(BUCKETS, 4, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.load_state_dict(at_start.state_dict())
    assert (sampler.epoch, sampler.batches_consumed) == (1, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(BUCKETS, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 2, seed=0)
    with pytest.raises(ValueError, match="no batches"):
        next(BucketBatchSampler(["a"], 2, seed=0, drop_last=True).forever())
