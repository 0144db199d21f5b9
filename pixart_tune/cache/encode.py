"""Batched encoders for the cache: the VAE over bucket batches, T5 over captions.

Both keep the device busy: a batch's inputs go up as one pinned, non-blocking copy, its outputs
come back as one copy per batch, and the host handles batch k (hands it to the file writer) only
after batch k+1 has been launched. Files are written by a background thread, so the encoder never
waits for the disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..config import Config
from ..models import DTYPES, load_text_encoder, load_tokenizer


class BackgroundWriter:
    """Runs write tasks on one thread, at most `max_pending` queued; errors surface in the caller.

    On leaving the `with` block (normally or by an exception) queued writes are finished first, so
    every batch that was encoded before a failure is kept on disk.
    """

    def __init__(self, max_pending: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixart-cache-writer")
        self._pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, fn: Callable, *args) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:  # keep what can be kept, but let the original exception be the one raised
                for f in self._pending:
                    f.exception()
        finally:
            self._pool.shutdown(wait=True)


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device tensor to (pinned) host memory; wait on the event before reading it."""
    if t.device.type != "cuda":
        return t.cpu(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned staging on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def free_device_memory(device: torch.device) -> None:
    """Return the cached blocks of a deleted encoder to the driver. No gc.collect(): the encoders
    hold no reference cycles, so `del` frees them, and a full collection costs 0.1-0.4 s here."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class LatentEncoder:
    """Collects decoded images per bucket and encodes full batches with the VAE.

    `on_batch(bucket, [(latent key, meta), ...], out)` receives each encoded batch, one batch late;
    out is a host tensor (B, 8, h, w) float32: channels 0-3 the posterior mean, 4-7 its std.
    """

    def __init__(self, vae, device: torch.device, batch_size: int, on_batch: Callable):
        self.vae, self.device, self.batch_size, self.on_batch = vae, device, batch_size, on_batch
        self.pending: dict[str, list] = {}
        self.inflight = None
        self.encoded = 0  # images passed through the VAE

    def add(self, bucket: str, key: str, pixels: torch.Tensor, meta: dict) -> None:
        """Queue one (H, W, 3) uint8 image; encodes its bucket's batch once full."""
        items = self.pending.setdefault(bucket, [])
        items.append((key, pixels, meta))
        if len(items) >= self.batch_size:
            self._encode(bucket, self.pending.pop(bucket))

    def flush(self) -> None:
        """Encode every partial batch and hand over the last results."""
        for bucket in list(self.pending):
            self._encode(bucket, self.pending.pop(bucket))
        self._retire()

    @torch.no_grad()
    def _encode(self, bucket: str, items: list) -> None:
        x = to_device(torch.stack([p for _, p, _ in items]), self.device)  # (B, H, W, 3) uint8
        # [0, 255] -> [-1, 1] in fp32 exactly as on the host, then the VAE's dtype, NCHW.
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).to(self.vae.dtype).contiguous()
        dist = self.vae.encode(x).latent_dist
        out, event = to_host(torch.cat([dist.mean, dist.std], dim=1).float())
        self.encoded += len(items)
        self._retire()  # the previous batch, while this one runs on the device
        self.inflight = (bucket, [(k, m) for k, _, m in items], out, event)

    def _retire(self) -> None:
        if self.inflight is not None:
            bucket, metas, out, event = self.inflight
            self.inflight = None
            if event is not None:
                event.synchronize()
            self.on_batch(bucket, metas, out)


class TextEncoder:
    """T5 + tokenizer as the pipeline uses them: padded to max_tokens, attention mask kept.

    Embeddings are stored trimmed to the tokens used (padding is masked out downstream), in bf16
    when T5 runs in bf16 (nothing is lost), else fp32.
    """

    def __init__(self, base: str, cfg: Config, device: torch.device):
        self.tokenizer = load_tokenizer(base, cfg.model.revision)
        self.model = load_text_encoder(base, DTYPES[cfg.data.t5_dtype], cfg.data.t5_quantization, cfg.model.revision)
        if cfg.data.t5_quantization == "none":
            self.model.to(device)
        # bitsandbytes places quantized weights itself: feed the inputs to wherever they are.
        self.device = next(self.model.parameters()).device
        self.max_tokens = cfg.data.max_tokens
        self.encoded = 0  # captions passed through T5

    @torch.no_grad()
    def encode(self, captions: list[str], on_batch: Callable, batch_size: int) -> None:
        """Encode in batches; on_batch(i0, [{"embeds": (L, C), "mask": (L,)}, ...]) one batch late."""
        inflight = None
        for i0 in range(0, len(captions), batch_size):
            tok = self.tokenizer(
                captions[i0 : i0 + batch_size], max_length=self.max_tokens, padding="max_length",
                truncation=True, add_special_tokens=True, return_tensors="pt",
            )  # fmt: skip
            lengths = tok.attention_mask.sum(1).clamp(min=1).tolist()  # on the host: no device sync
            ids, mask = to_device(tok.input_ids, self.device), to_device(tok.attention_mask, self.device)
            embeds = self.model(ids, attention_mask=mask)[0]  # (B, max_tokens, C)
            store = torch.bfloat16 if embeds.dtype == torch.bfloat16 else torch.float32
            out, event = to_host(embeds.to(store))
            self.encoded += len(lengths)
            _retire_text(inflight, on_batch)
            inflight = (i0, lengths, tok.attention_mask, out, event)
        _retire_text(inflight, on_batch)


def _retire_text(inflight, on_batch: Callable) -> None:
    if inflight is None:
        return
    i0, lengths, mask, out, event = inflight
    if event is not None:
        event.synchronize()
    on_batch(i0, [{"embeds": out[j, :n], "mask": mask[j, :n]} for j, n in enumerate(lengths)])
