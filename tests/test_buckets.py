"""PixArt buckets: table, assignment (matching diffusers' binning), fitting, micro-conditions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from PIL import Image

from pixart_tune.data.buckets import (
    assign_bucket,
    bucket_table,
    extreme_ratio_reason,
    fit_to_bucket,
    micro_conditions,
)


def test_tables_are_diffusers_tables():
    table = bucket_table(1024)
    assert len(table) == 33
    assert table["1.0"] == (1024, 1024) and table["0.57"] == (768, 1344) and table["4.0"] == (2048, 512)
    assert table == {k: (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}
    assert bucket_table(512)["1.0"] == (512, 512) and bucket_table(256)["1.0"] == (256, 256)
    with pytest.raises(ValueError, match="choose one of"):
        bucket_table(768)


@pytest.mark.parametrize(
    "height, width, key",
    [
        (1024, 1024, "1.0"),
        (500, 500, "1.0"),
        (768, 1344, "0.57"),
        (1344, 768, "1.75"),
        (600, 800, "0.72"),
        (3000, 2000, "1.46"),
        (2000, 3000, "0.68"),
        (512, 2048, "0.25"),
        (2048, 512, "4.0"),
        (100, 400, "0.25"),
    ],
)
def test_assign_bucket_known_sizes(height, width, key):
    assert assign_bucket(height, width, 1024) == key


def test_assign_bucket_agrees_with_diffusers_binning():
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(64, 4000), rng.randint(64, 4000)
        key = assign_bucket(height, width, 512)
        if key is None:
            continue
        expected = PixArtImageProcessor.classify_height_width_bin(height, width, ASPECT_RATIO_512_BIN)
        assert bucket_table(512)[key] == expected, (height, width)


def test_extreme_ratios_get_no_bucket():
    assert assign_bucket(2049, 512, 1024) is None  # h/w just over 4
    assert assign_bucket(100, 401, 1024) is None  # w/h just over 4
    assert assign_bucket(10, 1000, 256) is None
    assert "outside PixArt's buckets" in extreme_ratio_reason(10, 1000)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, 1024)


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_fit_downscales_and_centre_crops():
    # 800x400 (w x h) into a 256x256 bucket: scale 0.64 -> 512x256, 128 px cut each side.
    fitted, (top, left) = fit_to_bucket(halves(800, 400), (256, 256))
    assert fitted.size == (256, 256) and (top, left) == (0, 128)
    pixels = np.asarray(fitted).astype(int)
    assert np.allclose(pixels[128, 60], (255, 0, 0), atol=3) and np.allclose(pixels[128, 200], (0, 0, 255), atol=3)


def test_fit_upscales_small_images():
    fitted, offset = fit_to_bucket(Image.new("RGB", (70, 100), (5, 6, 7)), (512, 352))
    assert fitted.size == (352, 512)  # PIL sizes are (w, h); buckets are (h, w)
    assert offset == (0, 3)  # scale 5.12 -> 358 x 512, 6 px of width cut


@pytest.mark.parametrize("size", [(97, 131), (1000, 333), (333, 1000), (512, 512), (4000, 1001)])
def test_fit_gives_exact_bucket_size(size):
    height, width = size[1], size[0]
    key = assign_bucket(height, width, 1024)
    bucket = bucket_table(1024)[key]
    fitted, (top, left) = fit_to_bucket(Image.new("RGB", size), bucket)
    assert (fitted.height, fitted.width) == bucket and top >= 0 and left >= 0


def test_random_crop_is_reproducible_and_in_range():
    image = halves(900, 300)
    crops = [fit_to_bucket(image, (256, 256), random_crop=True, rng=random.Random(seed))[1] for seed in range(20)]
    assert crops == [fit_to_bucket(image, (256, 256), random_crop=True, rng=random.Random(s))[1] for s in range(20)]
    assert all(top == 0 and 0 <= left <= 768 - 256 for top, left in crops)
    assert len(set(crops)) > 5
    with pytest.raises(ValueError, match="rng"):
        fit_to_bucket(image, (256, 256), random_crop=True)


def test_flip_mirrors():
    plain, _ = fit_to_bucket(halves(400, 400), (256, 256))
    flipped, _ = fit_to_bucket(halves(400, 400), (256, 256), flip=True)
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])


def test_micro_conditions_are_bucket_size_and_ratio():
    resolution, aspect = micro_conditions((768, 1344))
    assert resolution == (768.0, 1344.0) and all(isinstance(v, float) for v in resolution)
    assert isinstance(aspect, float) and aspect == pytest.approx(768 / 1344)
