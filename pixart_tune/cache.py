"""The feature cache: VAE posteriors and T5 embeddings, computed once and stored on disk.

Content-addressed: a latent file's name is a hash of the image bytes and of everything that changes
its latent (resolution table, crop/flip settings, VAE identity and dtype); a text file's name is a
hash of the processed caption and of the text encoder's identity, dtype, max tokens and caption
processing. So adding an image encodes only that image, editing a caption re-encodes only that
caption, and changing the VAE invalidates the latents and nothing else.

Layout under the cache folder:
    latents/<k[:2]>/<k>.safetensors   mean, std: (4, h, w) fp32 — the posterior, re-sampled each step
    text/<k[:2]>/<k>.safetensors      embeds: (L, C), mask: (L,) — trimmed to the L tokens used
    null/<k>.safetensors              T5("") with its mask, for caption dropout
    skipped.jsonl                     one line per example not used, with the reason
Every file is written to a temporary name and renamed; each carries a checksum of its tensors,
so a truncated or corrupted file is detected and re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Config
from .data.buckets import assign_bucket, bucket_table, fit_to_bucket
from .data.captions import caption_processing_id, process_caption
from .data.images import BadImage, load_image
from .data.sources import DataError, iter_source
from .models import DTYPES, component_identity, load_text_encoder, load_tokenizer, load_vae

CACHE_FORMAT = 1


@dataclass
class Record:
    """One usable training example: where its features are and which bucket it is in."""

    key: str
    latent_file: str
    text_file: str
    bucket: str
    height: int  # bucket size in pixels
    width: int


@dataclass
class CacheIndex:
    records: list[Record]
    null_file: str
    cache_dir: Path
    counts: Counter = field(default_factory=Counter)  # encoded_latents, reused_latents, ... , skipped
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common())
        return (
            f"{len(self.records)} examples ready: latents {c['encoded_latents']} encoded, {c['reused_latents']} reused; "
            f"captions {c['encoded_texts']} encoded, {c['reused_texts']} reused; {len(self.skipped)} skipped"
            + (f" ({why})" if why else "")
        )


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_features(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Atomic write of one feature file, with a checksum of its tensors in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={**(meta or {}), "sha256": _checksum(tensors)})
    os.replace(tmp, path)


def read_features(path: Path | str) -> dict[str, torch.Tensor] | None:
    """Load a feature file; None if it is missing, truncated or fails its checksum."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except Exception:  # missing, truncated or not safetensors at all: safetensors raises its own types
        return None
    if expected is None or _checksum(tensors) != expected:
        return None
    return tensors


def _shard(root: Path, kind: str, key: str) -> Path:
    return root / kind / key[:2] / f"{key}.safetensors"


def default_cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    data = Path(cfg.data.path)
    return data / ".pixart_tune_cache" if data.is_dir() else Path(cfg.output_dir) / "cache"


class _TextEncoder:
    """T5 + tokenizer, loaded on first use and freed by the caller."""

    def __init__(self, base, cfg: Config, device):
        self.tokenizer = load_tokenizer(base, cfg.model.revision)
        self.model = load_text_encoder(base, DTYPES[cfg.data.t5_dtype], cfg.data.t5_quantization, cfg.model.revision)
        if cfg.data.t5_quantization == "none":
            self.model.to(device)
        self.max_tokens, self.device = cfg.data.max_tokens, device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        tok = self.tokenizer(
            captions, max_length=self.max_tokens, padding="max_length", truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )  # fmt: skip
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        embeds = self.model(ids, attention_mask=mask)[0]  # (B, max_tokens, C)
        out = []
        for e, m in zip(embeds, mask):
            used = max(int(m.sum()), 1)  # padding is masked out downstream, so keep only used tokens
            out.append({"embeds": e[:used].float().cpu(), "mask": m[:used].cpu()})
        return out


def build_cache(cfg: Config, base: str, device: str | torch.device = "cpu", show_progress: bool = True) -> CacheIndex:
    """Scan the dataset, encode what is not cached yet, and return the index of usable examples."""
    root = default_cache_dir(cfg)
    d = cfg.data
    vae_id = _sha("vae", component_identity(base, "vae", cfg.model.revision), cfg.model.weight_dtype)
    text_id = _sha(
        "t5", component_identity(base, "text_encoder", cfg.model.revision),
        component_identity(base, "tokenizer", cfg.model.revision),
        d.t5_dtype, d.t5_quantization, str(d.max_tokens), caption_processing_id(d.trigger, d.caption_template, d.clean_caption),
    )  # fmt: skip
    image_settings = f"{CACHE_FORMAT}|{d.resolution}|crop={d.random_crop}|flip={d.flip}"
    index = CacheIndex(records=[], null_file=str(_shard(root, "null", text_id)), cache_dir=root)
    table = bucket_table(d.resolution)

    # 1. Scan: hash every image and caption; decide what needs encoding.
    todo_latents: dict[str, tuple] = {}  # latent key -> (example, bytes)
    todo_texts: dict[str, str] = {}  # text key -> processed caption
    pending = []
    for ex in tqdm(iter_source(d.path, d.source, image_column=d.image_column, caption_column=d.caption_column,
                               split=d.split, on_error=d.on_error), desc="scanning", disable=not show_progress):  # fmt: skip
        if not hasattr(ex, "key"):  # a Skipped from the source
            index.skipped.append({"origin": ex.origin, "reason": ex.reason})
            continue
        data = ex.read_bytes()
        lkey = _sha(image_settings, vae_id, data)
        caption = process_caption(ex.caption, trigger=d.trigger, template=d.caption_template, clean=d.clean_caption)
        tkey = _sha(text_id, caption)
        lpath, tpath = _shard(root, "latents", lkey), _shard(root, "text", tkey)
        if read_features(lpath) is None:
            todo_latents[lkey] = (ex, data)
        if tkey not in todo_texts and read_features(tpath) is None:
            todo_texts[tkey] = caption
        pending.append((ex, lkey, tkey))
    index.counts["found"] = len(pending) + len(index.skipped)

    # 2. Latents, grouped by bucket so each VAE batch has one size.
    buckets_of: dict[str, str] = {}
    if todo_latents:
        vae = load_vae(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision).to(device).eval()
        by_bucket: dict[str, list] = {}
        for lkey, (ex, data) in tqdm(todo_latents.items(), desc="decoding images", disable=not show_progress):
            try:
                img = load_image(data, ex.origin)
            except BadImage as exc:
                _reject(index, d.on_error, ex.origin, str(exc))
                continue
            bucket = assign_bucket(img.height, img.width, d.resolution)
            if bucket is None:
                _reject(index, d.on_error, ex.origin, f"aspect ratio {img.height / img.width:.2f} outside PixArt's buckets")
                continue
            pixels, _ = fit_to_bucket(img, table[bucket])
            by_bucket.setdefault(bucket, []).append((lkey, pixels))
        bar = tqdm(total=sum(map(len, by_bucket.values())), desc="encoding latents", disable=not show_progress)
        for bucket, items in by_bucket.items():
            for i in range(0, len(items), d.encode_batch_size):
                chunk = items[i : i + d.encode_batch_size]
                x = torch.stack([_to_tensor(p) for _, p in chunk]).to(device, vae.dtype)  # (B, 3, H, W) in [-1, 1]
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                for (lkey, _), mean, std in zip(chunk, dist.mean, dist.std):
                    write_features(_shard(root, "latents", lkey), {"mean": mean.float(), "std": std.float()}, {"bucket": bucket})
                    buckets_of[lkey] = bucket
                    index.counts["encoded_latents"] += 1
                bar.update(len(chunk))
        bar.close()
        del vae

    # 3. Captions (and the null caption once per text-encoder setting).
    need_null = read_features(index.null_file) is None
    if todo_texts or need_null:
        encoder = _TextEncoder(base, cfg, device)
        keys = list(todo_texts)
        for i in tqdm(range(0, len(keys), d.encode_batch_size), desc="encoding captions", disable=not show_progress):
            chunk = keys[i : i + d.encode_batch_size]
            for tkey, feats in zip(chunk, encoder([todo_texts[k] for k in chunk])):
                write_features(_shard(root, "text", tkey), feats)
                index.counts["encoded_texts"] += 1
        if need_null:
            write_features(Path(index.null_file), encoder([""])[0])
        del encoder

    # 4. The index: every example whose two features exist.
    rejected = {s["origin"] for s in index.skipped}
    for ex, lkey, tkey in pending:
        if ex.origin in rejected:
            continue
        bucket = buckets_of.get(lkey)
        if bucket is None:
            bucket = _bucket_of(_shard(root, "latents", lkey))
            index.counts["reused_latents"] += 1
        if tkey not in todo_texts:
            index.counts["reused_texts"] += 1
        h, w = table[bucket]
        index.records.append(Record(ex.key, str(_shard(root, "latents", lkey)), str(_shard(root, "text", tkey)), bucket, h, w))
    index.counts["skipped"] = len(index.skipped)
    _write_report(root, index.skipped)
    return index


def _reject(index: CacheIndex, on_error: str, origin: str, reason: str) -> None:
    if on_error == "error":
        raise DataError(origin, reason)
    index.skipped.append({"origin": origin, "reason": reason})


def _bucket_of(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["bucket"]


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB (H, W) -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def _write_report(root: Path, skipped: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".skipped.jsonl.tmp"
    tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")
    os.replace(tmp, root / "skipped.jsonl")
