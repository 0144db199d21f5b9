"""What every cache file's name depends on, and the crop/flip variant rule.

Keys (SHA-256, hex):
  latent    image bytes + variant (crop, flip) + resolution table + VAE identity and dtype
  text      processed caption + T5 and tokenizer identity + T5 dtype and quantization + max tokens
            + caption processing (lowercase or cleaning@diffusers-version, trigger, template)
  null      the text key of "" (stored once, for caption dropout)
  rejected  image bytes + the decoding rules: an image that cannot be used is decided once
Nothing else enters a key: changing the training seed, batch size or caption of an image does not
touch its latents; changing the VAE or resolution touches no text file.

Variant rule (data.flip, data.random_crop, data.crop_variants):
  crops  random_crop=false: one centre crop ('center').
         random_crop=true: crop_variants crops ('crop0', 'crop1', ...), the i-th drawn from a
         random.Random seeded by (image digest, resolution, i): reproducible on every machine,
         independent of the training seed, and raising crop_variants keeps the crops already cached.
  flips  flip=false: unmirrored only. flip=true: every crop also mirrored ('...+flip').
  Each variant is its own latent file, and its own item of the training dataset, so an epoch shows
  every variant once (features.CachedFeatures). Turning flip on adds the mirrored files and keeps
  the unmirrored ones.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.buckets import MAX_ASPECT
from ..data.captions import caption_processing_id
from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from ..models import component_identity
from .store import sha

CACHE_FORMAT = 2  # bump when what a key means changes: every old file is then simply not found
REJECT_RULES = f"max_pixels={DEFAULT_MAX_PIXELS}|min_side={DEFAULT_MIN_SIDE}|max_aspect={MAX_ASPECT}"


@dataclass(frozen=True)
class Variant:
    """One cached version of an image: which crop, mirrored or not."""

    crop: int | None  # None: centre crop; i: the i-th random crop
    flip: bool

    @property
    def name(self) -> str:
        return ("center" if self.crop is None else f"crop{self.crop}") + ("+flip" if self.flip else "")


def variants(random_crop: bool, flip: bool, crop_variants: int = 1) -> tuple[Variant, ...]:
    """The variants cached per image, in a fixed order (crop-major, unmirrored first)."""
    if crop_variants < 1:
        raise ValueError(f"data.crop_variants must be >= 1, got {crop_variants}")
    crops = list(range(crop_variants)) if random_crop else [None]
    flips = (False, True) if flip else (False,)
    return tuple(Variant(c, f) for c in crops for f in flips)


def crop_rng(digest: str, resolution: int, crop: int) -> random.Random:
    """The generator that places random crop `crop` of an image (a str seed is stable across runs)."""
    return random.Random(f"pixart_tune-crop/{digest}/{resolution}/{crop}")


@dataclass(frozen=True)
class CacheKeys:
    """Key functions for one configuration (see the module docstring for what each covers)."""

    resolution: int
    vae_id: str
    text_id: str
    variants: tuple[Variant, ...]

    @classmethod
    def from_config(cls, cfg: Config, base: str) -> CacheKeys:
        d, m = cfg.data, cfg.model
        vae_id = sha("vae", component_fingerprint(base, "vae", m.revision), m.weight_dtype)
        text_id = sha(
            "t5", component_fingerprint(base, "text_encoder", m.revision),
            component_fingerprint(base, "tokenizer", m.revision), d.t5_dtype, d.t5_quantization,
            str(d.max_tokens), caption_processing_id(d.trigger, d.caption_template, d.clean_caption),
        )  # fmt: skip
        # data.crop_variants is read defensively until the config has the key (default 1).
        n_crops = int(getattr(d, "crop_variants", 1) or 1)
        return cls(d.resolution, vae_id, text_id, variants(d.random_crop, d.flip, n_crops))

    def latent(self, digest: str, variant: Variant) -> str:
        return sha("latent", str(CACHE_FORMAT), str(self.resolution), self.vae_id, digest, variant.name)

    def text(self, caption: str) -> str:
        return sha("text", str(CACHE_FORMAT), self.text_id, caption)

    def null(self) -> str:
        return self.text("")

    @staticmethod
    def rejected(digest: str) -> str:
        return sha("rejected", str(CACHE_FORMAT), REJECT_RULES, digest)


def component_fingerprint(base: str, component: str, revision: str | None = None) -> str:
    """Which component and which weights exactly, for cache keys.

    Local folder: models.component_identity (configs + weight-file sizes) plus a sample of every
    weight file's bytes (16 evenly spaced 64 KiB reads: a few MB for T5-XXL, not 19 GB), because two
    VAEs of one architecture (sd-vae-ft-ema vs ft-mse, or the tiny kit written with another seed)
    have identical configs and sizes, and stale latents would otherwise be reused.
    Hub id: id, revision, the snapshot commit it resolved to and the component's config file.
    """
    folder = Path(base) / component
    if not folder.is_dir():
        return _hub_fingerprint(base, component, revision)
    parts = [component_identity(base, component, revision)]
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix != ".json":
            st = f.stat()
            parts.append(_sampled_digest(str(f.resolve()), st.st_size, st.st_mtime_ns))
    return sha(*parts)[:16]


@functools.lru_cache(maxsize=256)
def _sampled_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hash of 16 evenly spaced 64 KiB chunks of a file (the whole file when at most 1 MiB)."""
    chunk, n = 65536, 16
    h = hashlib.sha256(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= chunk * n:
            h.update(f.read())
        else:
            for i in range(n):
                f.seek(i * (size - chunk) // (n - 1))
                h.update(f.read(chunk))
    return h.hexdigest()


# The file that describes each component on the Hub (tokenizer/ has no config.json).
_HUB_CONFIG = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


def _hub_fingerprint(base: str, component: str, revision: str | None) -> str:
    """id + revision + resolved snapshot commit + config bytes of a Hub component."""
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(base, _HUB_CONFIG.get(component, "config.json"), subfolder=component, revision=revision))
    commit = next((p.name for p in path.parents if p.parent.name == "snapshots"), "")
    return sha(component, base, str(revision), commit, path.read_bytes())[:16]
