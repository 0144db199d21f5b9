"""The background reader of the training loop: same batches in the same order, the data position of
the batches handed out (not of those read ahead), errors re-raised in the loop, a prompt stop."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pixart_tune.data.sampler import BucketBatchSampler
from pixart_tune.prefetch import BatchPrefetcher


class FakeFeatures:
    """Cached features stand-in: sample i holds the value i; reading sample `bad` fails."""

    def __init__(self, n: int, bad: int | None = None, delay: float = 0.0):
        self.buckets = ["256x256" if i % 3 else "192x320" for i in range(n)]
        self.bad, self.delay = bad, delay

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)
        if i == self.bad:
            raise OSError(f"cache file of sample {i} is unreadable")
        return {"mean": torch.full((4, 2, 2), float(i)), "std": torch.ones(4, 2, 2), "embeds": torch.full((3, 8), float(i)),
                "mask": torch.ones(3, dtype=torch.long), "resolution": torch.tensor([256.0, 256.0]),
                "aspect_ratio": torch.tensor([1.0])}  # fmt: skip


def test_same_batches_in_order_with_the_position_of_each():
    data = FakeFeatures(11)
    plain = BucketBatchSampler(data.buckets, 2, seed=3)
    expected = []
    for indices in plain.forever():  # what the loop trained before: two epochs and a bit
        expected.append((indices, plain.epoch, plain.batches_consumed))
        if len(expected) == 15:
            break
    prefetcher = BatchPrefetcher(data, BucketBatchSampler(data.buckets, 2, seed=3), "cpu", depth=3)
    try:
        for indices, epoch, consumed in expected:
            batch, position = next(prefetcher)
            assert batch["mean"][:, 0, 0, 0].tolist() == [float(i) for i in indices]
            assert position == {"epoch": epoch, "batches_consumed": consumed}
        deadline = time.monotonic() + 10  # the reader runs ahead (a loaded machine may take a while) ...
        while (prefetcher.sampler.epoch, prefetcher.sampler.batches_consumed) == (epoch, consumed):
            assert time.monotonic() < deadline, "the reader did not run ahead of the consumer"
            time.sleep(0.01)
        resumed = BucketBatchSampler(data.buckets, 2, seed=3)  # ... but a resume from `position` is exact
        resumed.load_state_dict({**resumed.state_dict(), **position})
        after = BatchPrefetcher(data, resumed, "cpu")
        batch, _ = next(after)
        after.close()
        assert batch["mean"][:, 0, 0, 0].tolist() == [float(i) for i in next(plain.forever())]
    finally:
        prefetcher.close()


def test_a_read_error_reaches_the_training_loop():
    data = FakeFeatures(6, bad=4)
    sampler = BucketBatchSampler(data.buckets, 1, seed=0)
    order = [i for batch, _ in zip(sampler.forever(), range(6)) for i in batch]
    prefetcher = BatchPrefetcher(data, BucketBatchSampler(data.buckets, 1, seed=0), "cpu")
    for _ in range(order.index(4)):
        next(prefetcher)
    with pytest.raises(OSError, match="sample 4 is unreadable"):
        next(prefetcher)
    assert not prefetcher._thread.is_alive()


def test_close_stops_a_reader_blocked_on_a_full_queue():
    prefetcher = BatchPrefetcher(FakeFeatures(8), BucketBatchSampler(FakeFeatures(8).buckets, 2, seed=0), "cpu", depth=1)
    time.sleep(0.2)  # the queue is full and the reader waits
    started = time.perf_counter()
    prefetcher.close()
    assert time.perf_counter() - started < 2 and not prefetcher._thread.is_alive()
    assert all(t.name != "pixart-tune-prefetch" for t in threading.enumerate())
