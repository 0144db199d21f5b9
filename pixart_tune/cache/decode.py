"""Decoding images for the cache: bytes -> upright RGB -> bucket -> crops, in DataLoader workers.

A job is one distinct image (by content) and the variants of it that are missing from the cache.
Workers return uint8 (H, W, 3) tensors, the smallest form of the pixels; the conversion to the
VAE's [-1, 1] floats happens on the encoding device. Problems come back as a reason, never as an
exception, so one bad file cannot stop the other workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset

from ..data.buckets import assign_bucket, bucket_table, extreme_ratio_reason, fit_to_bucket, resize_to_cover
from ..data.examples import ImageBytes, image_digest
from ..data.images import BadImage, load_image
from .keys import Variant, crop_rng


@dataclass(frozen=True)
class DecodeJob:
    digest: str  # SHA-256 of the image bytes seen when scanning
    origin: str  # for messages: the first example that has these bytes
    image: ImageBytes  # a picklable reference to the bytes (file path, tar range, inline bytes)
    outputs: tuple[tuple[str, int | None, bool], ...]  # (latent key, crop index or None=centre, flip)


class DecodeJobs(Dataset):
    """Map-style dataset of DecodeJobs; item i is the decoded result of job i (see decode_job)."""

    def __init__(self, jobs: list[DecodeJob], resolution: int):
        self.jobs, self.resolution = jobs, resolution

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        return decode_job(self.jobs[i], self.resolution)


def keep_as_is(item):
    """collate_fn for the decode DataLoader: results are dicts of tensors and text, passed through."""
    return item


def decode_job(job: DecodeJob, resolution: int) -> dict:
    """Decode, bucket and crop one image.

    Returns {digest, origin, bucket, size (h, w), items: [(latent key, pixels (H, W, 3) uint8,
    meta)], reason: None} or, when the image cannot be used, {..., reason: str, lasting: bool};
    `lasting` is False for problems that may pass (unreadable now, changed since the scan).
    """
    result = {"digest": job.digest, "origin": job.origin, "bucket": None, "size": None, "items": [], "reason": None}
    try:
        data = job.image.read()
    except OSError as e:
        return {**result, "reason": f"cannot read the image: {e}", "lasting": False}
    if image_digest(data) != job.digest:
        return {**result, "reason": "the image changed while the cache was being built; run again", "lasting": False}
    try:
        image = load_image(data, job.origin)
    except BadImage as e:
        return {**result, "reason": e.reason, "lasting": True}  # e.reason: without the origin
    bucket = assign_bucket(image.height, image.width, resolution)
    if bucket is None:
        return {**result, "reason": extreme_ratio_reason(image.height, image.width), "lasting": True}
    hw = bucket_table(resolution)[bucket]
    covered = resize_to_cover(image, hw)  # once; every crop below is then a plain crop
    crops: dict[int | None, tuple[torch.Tensor, tuple[int, int]]] = {}
    items = []
    for latent_key, crop, flip in job.outputs:
        if crop not in crops:
            rng = None if crop is None else crop_rng(job.digest, resolution, crop)
            fitted, offset = fit_to_bucket(covered, hw, random_crop=crop is not None, rng=rng)
            crops[crop] = (torch.from_numpy(np.array(fitted, dtype=np.uint8)), offset)  # (H, W, 3)
        pixels, (top, left) = crops[crop]
        meta = {"variant": Variant(crop, flip).name, "orig_hw": f"{image.height},{image.width}",
                "crop_top_left": f"{top},{left}"}  # fmt: skip
        # Mirroring the cropped pixels equals fit_to_bucket(flip=True): crop first, then mirror.
        items.append((latent_key, pixels.flip(1) if flip else pixels, meta))
    return {**result, "bucket": bucket, "size": (image.height, image.width), "items": items}


def bucket_hint(data: bytes, resolution: int) -> str:
    """The bucket an image will probably get, from its header alone ('' when unknown).

    Used only to ORDER decode jobs so that same-bucket images arrive together and batches fill
    without holding many partial ones; the decoded image decides the real bucket.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
        return assign_bucket(height, width, resolution) or ""
    except Exception:  # noqa: BLE001 -- a header PIL cannot read: the worker reports the real problem
        return ""
