"""PixArt aspect-ratio buckets: which bucket an image goes to, and how it is fitted to it.

The tables are diffusers' own `ASPECT_RATIO_{1024,512,256}_BIN` (33 ratios from 0.25 to 4.0, keys
are height/width as strings, values (height, width)), the ones PixArtAlphaPipeline bins generation
sizes into. Training in those buckets means training at the sizes the pipeline generates.

Rules (also in data/README.md):
  - Bucket: the ratio key closest to h/w (ties: the first in table order, as diffusers does).
  - Extreme ratios: an image taller or wider than 4:1 (h/w outside [0.25, 4.0], the range of the
    table) gets no bucket. This is the official trainer's rule; tolerance beyond the table is zero,
    because cropping such an image to a 4:1 bucket would throw away most of it.
  - Fitting: resize (bicubic) so the image covers the bucket while keeping its aspect ratio, then
    crop the excess (centre, or random). Images smaller than their bucket are UPSCALED the same way:
    every bucket must be filled exactly; images.load_image already refuses really tiny ones.
"""

from __future__ import annotations

import functools
import random

from PIL import Image

MAX_ASPECT = 4  # max(h/w, w/h) allowed; PixArt's table and its official data filter stop at 4:1


@functools.cache
def _diffusers_tables() -> dict[int, dict[str, list[float]]]:
    """diffusers' bin tables, imported on first use (the pipeline module takes seconds to import)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    return {1024: ASPECT_RATIO_1024_BIN, 512: ASPECT_RATIO_512_BIN, 256: ASPECT_RATIO_256_BIN}


def bucket_table(resolution: int) -> dict[str, tuple[int, int]]:
    """Ratio key (h/w as text, e.g. '0.57') -> bucket (height, width) in pixels, for 256, 512 or 1024."""
    tables = _diffusers_tables()
    if resolution not in tables:
        raise ValueError(f"no PixArt bucket table for resolution {resolution}; choose one of {sorted(tables)}")
    return {key: (int(h), int(w)) for key, (h, w) in tables[resolution].items()}


def assign_bucket(height: int, width: int, resolution: int) -> str | None:
    """The ratio key of the bucket closest to height/width, or None when the ratio exceeds 4:1."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
    table = bucket_table(resolution)
    if height > MAX_ASPECT * width or width > MAX_ASPECT * height:  # integer test: no float edge cases
        return None
    ratio = height / width
    return min(table, key=lambda key: abs(float(key) - ratio))


def extreme_ratio_reason(height: int, width: int) -> str:
    """The message for an image that assign_bucket refuses."""
    return f"aspect ratio {height / width:.3g} (h/w, {width}x{height}) outside PixArt's buckets [0.25, 4.0]"


def fit_to_bucket(
    image: Image.Image,
    bucket_hw: tuple[int, int],
    *,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the bucket, crop to exactly (h, w), optionally mirror; returns (image, (top, left)).

    `flip=True` mirrors this image (the caller decides, e.g. `flip = rng.random() < 0.5`, so it knows
    and can record it). `random_crop=True` draws the crop offset from `rng`, which is then required.
    """
    bucket_h, bucket_w = bucket_hw
    if random_crop and rng is None:
        raise ValueError("random_crop=True needs rng=random.Random(seed), so crops are reproducible")
    covered = _resize_to_cover(image, bucket_h, bucket_w)
    top, left = _crop_offset(covered.height - bucket_h, covered.width - bucket_w, random_crop, rng)
    fitted = covered.crop((left, top, left + bucket_w, top + bucket_h))
    if flip:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return fitted, (top, left)


def resize_to_cover(image: Image.Image, bucket_hw: tuple[int, int]) -> Image.Image:
    """The resize step of fit_to_bucket alone; fitting its result again resizes nothing, so several
    crops of one image (data.crop_variants) cost one resize."""
    return _resize_to_cover(image, *bucket_hw)


def _resize_to_cover(image: Image.Image, bucket_h: int, bucket_w: int) -> Image.Image:
    """Scale (up or down, bicubic) so both sides reach the bucket, keeping the aspect ratio."""
    scale = max(bucket_h / image.height, bucket_w / image.width)
    # max(): rounding must never leave a side one pixel short of the bucket.
    size = (max(bucket_w, round(image.width * scale)), max(bucket_h, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def _crop_offset(excess_h: int, excess_w: int, random_crop: bool, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the crop window: centred, or uniform over the valid offsets."""
    if random_crop:
        return rng.randint(0, excess_h), rng.randint(0, excess_w)
    return excess_h // 2, excess_w // 2


def micro_conditions(bucket_hw: tuple[int, int]) -> tuple[tuple[float, float], float]:
    """PixArt-α 1024-MS micro-conditions for a bucket: (resolution (h, w), aspect_ratio h/w), as floats.

    We condition on the BUCKET size and its h/w, which is exactly what PixArtAlphaPipeline passes at
    inference (the binned generation height/width and their ratio). The official trainer instead
    passes each image's ORIGINAL (h, w); we prefer the pipeline's values so training sees the
    conditions that inference will use, and so cached features do not depend on source image size.
    Only checkpoints with sample_size 128 (1024-MS) use these; others ignore them.
    """
    height, width = bucket_hw
    return (float(height), float(width)), float(height / width)
