"""Batches of one aspect-ratio bucket each: seeded, sharded across ranks, resumable mid-epoch.

How one epoch is planned (identically on every rank, from seed, epoch and the bucket list only):
  1. Each bucket's indices are shuffled.
  2. They are cut into GLOBAL batches of batch_size * world_size indices.
  3. A bucket's last, incomplete global batch is filled up by repeating that bucket's own shuffled
     samples from the start (cycling if the bucket is smaller than one global batch). So small
     buckets are trained on, never dropped silently; the cost is a few repeats per epoch. With
     drop_last=True the incomplete global batch is dropped instead (`dropped_per_epoch` counts it).
  4. The global batches of all buckets are shuffled together.
  5. Rank r takes slice [r*batch_size, (r+1)*batch_size) of every global batch, so all ranks see the
     same number of batches, each batch from one bucket, and the ranks' indices are disjoint
     (except for the repeats of step 3).

The sampler is per epoch: iterating yields the rest of the current epoch; `set_epoch` starts another.
`forever()` is the trainer's "next batch, forever" view. `state_dict()` records (epoch, batches
consumed); after `load_state_dict` iteration continues with exactly the batches an uninterrupted
run would have seen next (under another plan, e.g. more processes: from the next epoch's start).
Note: batches count as consumed when the iterator hands them out; when a DataLoader prefetches,
save the number of batches actually trained on instead.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import warnings
from collections.abc import Iterator, Sequence


class BucketBatchSampler:
    """Yields lists of dataset indices, all from one bucket, for this rank."""

    def __init__(
        self,
        buckets: Sequence[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not buckets:
            raise ValueError("no samples to batch: the bucket list is empty")
        self.buckets = list(buckets)  # buckets[i] = bucket key of dataset index i
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_consumed = 0  # of the current epoch
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- planning ------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Indices per step across all ranks."""
        return self.batch_size * self.world_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's plan: every global batch, in order (the same list on every rank)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = random.Random(f"pixart_tune-buckets/{self.seed}/{epoch}")  # str seed: stable across runs
        groups = self._indices_by_bucket()
        batches = []
        for key in sorted(groups):  # sorted: the plan must not depend on which bucket appears first
            indices = groups[key]
            rng.shuffle(indices)
            batches.extend(self._cut(indices))
        rng.shuffle(batches)
        self._plan_cache = (epoch, batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for a whole epoch."""
        start, stop = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [batch[start:stop] for batch in self.global_batches(epoch)]

    def _indices_by_bucket(self) -> dict[str, list[int]]:
        """Bucket key -> dataset indices in that bucket (a fresh list each call)."""
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(self.buckets):
            groups.setdefault(key, []).append(index)
        return groups

    def _cut(self, indices: list[int]) -> list[list[int]]:
        """Split one bucket's shuffled indices into full global batches (fill or drop the last)."""
        size = self.global_batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        if len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            else:
                missing = size - len(batches[-1])
                batches[-1] = batches[-1] + list(itertools.islice(itertools.cycle(indices), missing))
        return batches

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of every epoch by drop_last (0 when drop_last is False)."""
        if not self.drop_last:
            return 0
        return sum(len(v) % self.global_batch_size for v in self._indices_by_bucket().values())

    # -- iteration and resume ------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self.global_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, from the resume position."""
        batches = self.epoch_batches(self.epoch)
        while self.batches_consumed < len(batches):
            batch = batches[self.batches_consumed]
            self.batches_consumed += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch."""
        self.epoch = epoch
        self.batches_consumed = 0

    def forever(self) -> Iterator[list[int]]:
        """Batches without end: the rest of this epoch, then each following epoch in turn."""
        if len(self) == 0:
            raise ValueError("no batches: every bucket is smaller than one global batch and drop_last=True")
        while True:
            yield from self
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """Position (epoch, batches consumed) plus what the plan depends on, to catch mismatches."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "buckets_digest": self._buckets_digest(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        The epoch's plan depends on the data, seed, batch size, number of processes and drop_last. If
        any changed since the save (say the run moves from one GPU to two), the saved position means
        nothing in the new plan: the run goes on from the start of the next epoch, skipping the rest
        of the saved one, and a warning says what changed. The weights lose nothing.
        """
        changed = []
        for name in ("seed", "batch_size", "world_size", "drop_last", "buckets_digest"):
            saved = state.get(name)
            current = self._buckets_digest() if name == "buckets_digest" else getattr(self, name)
            if saved is not None and saved != current:
                changed.append(f"{name} {saved!r} -> {current!r}")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        if changed and self.batches_consumed:
            warnings.warn(
                f"the batch order changed since the checkpoint ({', '.join(changed)}): training goes on from the "
                f"start of epoch {self.epoch + 1}, skipping the rest of epoch {self.epoch} (its first "
                f"{self.batches_consumed} batches were trained). Resume with the same data, seed, batch size and "
                "number of processes to continue mid-epoch exactly",
                stacklevel=2,
            )
            self.set_epoch(self.epoch + 1)

    def _buckets_digest(self) -> str:
        """A short fingerprint of the bucket list (dataset order and bucket of every sample)."""
        return hashlib.sha256("\n".join(self.buckets).encode("utf-8")).hexdigest()[:16]
