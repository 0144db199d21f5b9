"""build_cache: scan the dataset, encode what is missing (this rank's share), index what is on disk.

Phases, each timed in CacheIndex.timings:
  scan     read and hash every example's bytes; list the latent variants and captions not cached
  latents  decode in DataLoader workers -> bucket batches -> VAE -> files (background writer)
  texts    captions -> T5 -> files; the null caption "" once
  index    from disk, the same on every rank: usable records, and skipped examples with reasons

Several processes (accelerate launch): every rank scans, encodes the images and captions whose key
hashes to it (key mod world_size == rank), waits at `barrier`, then builds the index from disk. Keys
decide the share, not list positions, so ranks that scan at slightly different moments still split
the work without overlap. An image found unusable is recorded on disk (rejected/), so every rank
reports it and later builds skip it without decoding it again.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..data.buckets import bucket_table
from ..data.captions import process_caption
from ..data.examples import Skipped, image_digest
from ..data.sources import DataError, iter_source
from ..models import DTYPES, load_vae
from . import store
from .decode import DecodeJob, DecodeJobs, bucket_hint, keep_as_is
from .digest_memo import DigestMemo
from .encode import BackgroundWriter, LatentEncoder, TextEncoder, free_device_memory
from .keys import CacheKeys
from .store import CacheIndex, Record, default_cache_dir, read_header, read_json, shard


@dataclass
class _Example:
    key: str
    origin: str
    digest: str
    latent_keys: tuple[str, ...]
    text_key: str


@dataclass
class _Scan:
    items: list = field(default_factory=list)  # _Example or {"origin", "reason"}, in dataset order
    jobs: list[DecodeJob] = field(default_factory=list)  # images with variants to encode
    texts: dict[str, str] = field(default_factory=dict)  # text key -> caption, to encode
    users: dict[str, set] = field(default_factory=dict)  # text key -> digests of the images it captions
    rejected: dict[str, str] = field(default_factory=dict)  # image digest -> why it cannot be used
    known: dict[str, dict] = field(default_factory=dict)  # key -> header metadata of a valid file


def build_cache(
    cfg: Config,
    base: str,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    *,
    verify: bool = False,
) -> CacheIndex:
    """Scan the dataset, encode what is not cached yet (this rank's share), return the index.

    Several processes: pass rank, world_size and a barrier callable (accelerate:
    `barrier=accelerator.wait_for_everyone`); every rank returns the same index. verify=True checks
    the checksum of every existing file (default: a cheap structural check; a file whose data is
    damaged is then caught when training reads it, and re-encoded by the next build).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("build_cache with world_size > 1 needs barrier= (e.g. accelerator.wait_for_everyone)")
    started = time.perf_counter()
    device = torch.device(device)
    root = default_cache_dir(cfg)
    timings: dict[str, float] = {}
    keys = CacheKeys.from_config(cfg, base)
    timings["keys"] = time.perf_counter() - started
    counts: Counter = Counter()

    def mine(key: str) -> bool:
        return int(key[:8], 16) % world_size == rank

    t = time.perf_counter()
    scan = _scan(cfg, keys, root, verify, show_progress)
    timings["scan"] = time.perf_counter() - t

    jobs = [j for j in scan.jobs if mine(j.digest)]
    if jobs:
        _encode_latents(cfg, base, device, jobs, root, scan, counts, timings, show_progress)

    # Captions of images found unusable are not encoded (on this rank's knowledge).
    texts = {k: c for k, c in scan.texts.items() if mine(k) and not all(g in scan.rejected for g in scan.users[k])}
    null_file = shard(root, "null", keys.null())
    need_null = rank == 0 and store.read_features(null_file) is None
    if texts or need_null:
        _encode_texts(cfg, base, device, texts, null_file if need_null else None, root, scan, counts, timings,
                      show_progress)  # fmt: skip

    if world_size > 1:
        store.write_json(root / f".counts-{rank}-of-{world_size}.json", dict(counts))
        barrier()
        counts = Counter()
        for r in range(world_size):
            counts.update(read_json(root / f".counts-{r}-of-{world_size}.json") or {})

    t = time.perf_counter()
    index = _index(cfg, keys, root, scan, counts)
    index.null_file = str(null_file)
    if rank == 0:
        store.write_report(root, index.skipped)
        store.remove_stale_temps(root)
    timings["index"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    index.timings = timings
    return index


def _scan(cfg: Config, keys: CacheKeys, root: Path, verify: bool, show_progress: bool) -> _Scan:
    """Hash every example; decide which latent variants and captions are missing."""
    d = cfg.data
    scan = _Scan()

    def cached(kind: str, key: str) -> bool:
        path = shard(root, kind, key)
        meta = read_header(path)
        if meta is not None and verify and store.read_features(path) is None:
            meta = None
        if meta is not None:
            scan.known[key] = meta
        return meta is not None

    def read_or_reject(item) -> bytes | None:
        """The image's bytes, or None once an unreadable file is recorded as skipped (or raised, per data.on_error)."""
        try:
            return item.read_bytes()
        except OSError as e:
            _reject_now(d.on_error, scan, item.origin, f"cannot read the image: {e}")
            return None

    memo = DigestMemo(root)  # digests of unchanged files from earlier scans: no re-reading them
    source = iter_source(d.path, d.source, image_column=d.image_column, caption_column=d.caption_column,
                         split=d.split, on_error=d.on_error, digest_memo=memo)  # fmt: skip
    seen: set[str] = set()
    try:
        for item in tqdm(source, desc="scanning", unit="ex", disable=not show_progress):
            if isinstance(item, Skipped):  # a layout problem, already named by the source
                scan.items.append({"origin": item.origin, "reason": item.reason})
                continue
            data, digest = None, item.digest  # the source hashed it already while looking for duplicates
            if digest is None:
                if (data := read_or_reject(item)) is None:
                    continue
                digest = image_digest(data)
            caption = process_caption(item.caption, trigger=d.trigger, template=d.caption_template, clean=d.clean_caption)
            ex = _Example(item.key, item.origin, digest, tuple(keys.latent(digest, v) for v in keys.variants), keys.text(caption))
            if digest not in seen:
                seen.add(digest)
                marker = read_json(shard(root, "rejected", keys.rejected(digest), ".json"))
                if marker is not None:
                    scan.rejected[digest] = str(marker.get("reason", "found unusable by an earlier build"))
                else:
                    missing = [(k, v) for k, v in zip(ex.latent_keys, keys.variants) if not cached("latents", k)]
                    if missing:
                        if data is None and (data := read_or_reject(item)) is None:  # only images still to encode are read again
                            continue
                        outputs = tuple((k, v.crop, v.flip) for k, v in missing)
                        scan.jobs.append((bucket_hint(data, d.resolution), DecodeJob(digest, item.origin, item.image, outputs)))
            if digest in scan.rejected and d.on_error == "error":
                raise DataError(item.origin, scan.rejected[digest])
            if ex.text_key not in scan.users and not cached("text", ex.text_key):
                scan.texts[ex.text_key] = caption
            scan.users.setdefault(ex.text_key, set()).add(digest)
            scan.items.append(ex)
    finally:
        memo.save()  # what was hashed stays hashed, also when the scan stops on an error
    # Same-bucket images next to each other: batches fill in order, few partial batches wait.
    scan.jobs = [job for _, job in sorted(scan.jobs, key=lambda hj: hj[0])]
    return scan


def _reject_now(on_error: str, scan: _Scan, origin: str, reason: str) -> None:
    if on_error == "error":
        raise DataError(origin, reason)
    scan.items.append({"origin": origin, "reason": reason})


def _encode_latents(cfg, base, device, jobs, root, scan, counts, timings, show_progress) -> None:
    """Decode (workers) -> bucket batches -> VAE -> latent files, for this rank's jobs."""
    d, keys_rejected = cfg.data, CacheKeys.rejected
    t = time.perf_counter()
    vae = load_vae(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision).to(device).eval().requires_grad_(False)
    timings["load_vae"] = time.perf_counter() - t
    t = time.perf_counter()
    workers = min(d.num_workers, len(jobs))
    loader = DataLoader(
        DecodeJobs(jobs, d.resolution), batch_size=None, shuffle=False, num_workers=workers, collate_fn=keep_as_is,
        prefetch_factor=max(2, -(-2 * d.encode_batch_size // workers)) if workers else None,
    )  # fmt: skip
    n_outputs = {j.digest: len(j.outputs) for j in jobs}
    bar = tqdm(total=sum(n_outputs.values()), desc="encoding latents", unit="img", disable=not show_progress)

    results = iter(loader)  # workers start here, before the writer thread exists
    try:
        with BackgroundWriter() as writer:

            def on_batch(bucket: str, metas: list, out: torch.Tensor) -> None:
                for key, meta in metas:
                    meta["bucket"] = bucket
                    scan.known[key] = meta
                writer.submit(_write_latents, root, metas, out)
                bar.update(len(metas))

            encoder = LatentEncoder(vae, device, d.encode_batch_size, on_batch)
            for res in results:
                if res["reason"] is not None:
                    scan.rejected[res["digest"]] = res["reason"]
                    if res["lasting"]:
                        path = shard(root, "rejected", keys_rejected(res["digest"]), ".json")
                        store.write_json(path, {"reason": res["reason"], "origin": res["origin"]})
                    if d.on_error == "error":
                        raise DataError(res["origin"], res["reason"])
                    bar.total -= n_outputs[res["digest"]]
                    continue
                for key, pixels, meta in res["items"]:
                    encoder.add(res["bucket"], key, pixels, meta)
            encoder.flush()
    finally:
        # Stop the decode workers here, error or not. After an error the traceback keeps this frame, and
        # so the iterator, alive; its workers were then joined whenever it was collected, 5 s each.
        del results
    bar.close()
    counts["encoded_latents"] += encoder.encoded
    del vae, encoder, loader
    free_device_memory(device)
    timings["latents"] = time.perf_counter() - t


def _write_latents(root: Path, metas: list, out: torch.Tensor) -> None:
    for i, (key, meta) in enumerate(metas):
        store.write_features(shard(root, "latents", key), {"mean": out[i, :4], "std": out[i, 4:]}, meta)


def _encode_texts(cfg, base, device, texts, null_file, root, scan, counts, timings, show_progress) -> None:
    """Captions (this rank's share) and, when missing, the null caption "" (in the last batch)."""
    t = time.perf_counter()
    encoder = TextEncoder(base, cfg, device)
    timings["load_t5"] = time.perf_counter() - t
    t = time.perf_counter()
    paths = [shard(root, "text", k) for k in texts] + ([null_file] if null_file is not None else [])
    captions = list(texts.values()) + ([""] if null_file is not None else [])
    bar = tqdm(total=len(texts), desc="encoding captions", unit="cap", disable=not show_progress)
    with BackgroundWriter() as writer:

        def on_batch(i0: int, feats: list) -> None:
            writer.submit(_write_texts, paths[i0 : i0 + len(feats)], feats)
            bar.update(sum(1 for p in paths[i0 : i0 + len(feats)] if p != null_file))

        encoder.encode(captions, on_batch, cfg.data.encode_batch_size)
    for key in texts:
        scan.known[key] = {}
    counts["encoded_texts"] += len(texts)
    bar.close()
    del encoder
    free_device_memory(device)
    timings["texts"] = time.perf_counter() - t


def _write_texts(paths: list[Path], feats: list[dict]) -> None:
    for path, f in zip(paths, feats):
        store.write_features(path, f)


def _index(cfg: Config, keys: CacheKeys, root: Path, scan: _Scan, counts: Counter) -> CacheIndex:
    """Records for examples whose features are all on disk; every other example skipped with its reason."""
    table = bucket_table(cfg.data.resolution)
    index = CacheIndex(records=[], null_file="", cache_dir=root)
    names = tuple(v.name for v in keys.variants)
    latent_files, text_files = set(), set()

    def meta_of(kind: str, key: str) -> dict | None:
        if key not in scan.known:  # written by another rank: check it now
            meta = read_header(shard(root, kind, key))
            if meta is None:
                return None
            scan.known[key] = meta
        return scan.known[key]

    for ex in scan.items:
        if isinstance(ex, dict):
            index.skipped.append(ex)
            continue
        reason = scan.rejected.get(ex.digest)
        metas = [] if reason else [meta_of("latents", k) for k in ex.latent_keys]
        if reason is None and any(m is None for m in metas):  # another rank may have found it unusable
            marker = read_json(shard(root, "rejected", keys.rejected(ex.digest), ".json"))
            reason = str(marker.get("reason")) if marker else "latents missing after the cache build (did a process stop?)"
        if reason is None and meta_of("text", ex.text_key) is None:
            reason = "caption embedding missing after the cache build (did a process stop?)"
        if reason is not None:
            if cfg.data.on_error == "error":
                raise DataError(ex.origin, reason)
            index.skipped.append({"origin": ex.origin, "reason": reason})
            continue
        bucket = metas[0]["bucket"]
        orig = metas[0].get("orig_hw")
        index.records.append(
            Record(
                key=ex.key, latent_files=tuple(str(shard(root, "latents", k)) for k in ex.latent_keys),
                text_file=str(shard(root, "text", ex.text_key)), bucket=bucket, height=table[bucket][0],
                width=table[bucket][1], variants=names,
                original_hw=tuple(int(v) for v in orig.split(",")) if orig else None,
            )
        )  # fmt: skip
        latent_files.update(ex.latent_keys)
        text_files.add(ex.text_key)

    c = index.counts
    c.update(counts)
    c["found"] = len(scan.items)
    c["used"], c["skipped"] = len(index.records), len(index.skipped)
    c["latent_files"], c["text_files"] = len(latent_files), len(text_files)
    c["reused_latents"] = max(0, len(latent_files) - c["encoded_latents"])
    c["reused_texts"] = max(0, len(text_files) - c["encoded_texts"])
    return index
