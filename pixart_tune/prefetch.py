"""Read the next batches of cached features in a background thread while the GPU trains.

Without it, every step ends with the GPU idle while the host reads the next batch's feature files,
checks their checksums and collates them (tens of ms at 1024 px, batch 8). A thread does that work
ahead of time; file reads and SHA-256 release the GIL, so it overlaps the training step's Python.

Each batch comes with the sampler position right after it, so a checkpoint records the batches
that were trained, not the ones already fetched: resuming replays exactly what an uninterrupted
run would train.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from .data.sampler import BucketBatchSampler
from .features import CachedFeatures, collate


class BatchPrefetcher:
    """`next(prefetcher)` -> (batch on `device`, sampler position after that batch)."""

    def __init__(self, dataset: CachedFeatures, sampler: BucketBatchSampler, device, depth: int = 2):
        self.sampler = sampler
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(dataset, sampler.forever()), daemon=True,
                                        name="pixart-tune-prefetch")  # fmt: skip
        self._thread.start()

    def _fill(self, dataset: CachedFeatures, batches: Iterator[list[int]]) -> None:
        pin = self.device.type == "cuda"  # page-locked memory lets the copy to the GPU run asynchronously
        try:
            for indices in batches:
                position = {"epoch": self.sampler.epoch, "batches_consumed": self.sampler.batches_consumed}
                batch = collate([dataset[i] for i in indices])
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put((batch, position)):
                    return
        except BaseException as error:  # noqa: BLE001 -- e.g. a corrupt cache file: re-raised in the training loop
            self._put(error)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, position = item
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, position

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue); safe to call twice."""
        self._stop.set()
        while True:  # make room so a blocked put returns and sees the stop flag
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
