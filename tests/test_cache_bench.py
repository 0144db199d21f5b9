"""Smoke test of the cache benchmark on CPU with the tiny kit (the real figure needs a GPU)."""

from __future__ import annotations

import pytest
from PIL import Image

from pixart_tune.bench_cache import measure_cache_throughput, write_synthetic_photos
from pixart_tune.data.buckets import assign_bucket

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_photos_have_varied_buckets_and_captions(tmp_path):
    sizes = write_synthetic_photos(tmp_path, 6, 256)
    assert len({assign_bucket(h, w, 256) for h, w in sizes}) == 6
    for i, (h, w) in enumerate(sizes):
        with Image.open(tmp_path / f"{i:05d}.jpg") as im:
            assert im.size == (w, h) and im.format == "JPEG"
        assert h * w >= 256 * 256, "larger than the bucket, as photos usually are"
    captions = [(tmp_path / f"{i:05d}.txt").read_text() for i in range(6)]
    assert len(set(captions)) == 6


def test_measure_cache_throughput_on_cpu(tiny_base):
    result = measure_cache_throughput(str(tiny_base), "cpu", n_images=3, resolution=256, batch_size=2, workers=1)
    assert result["device"] == "cpu" and result["n_images"] == 3
    assert result["cache_counts"]["encoded_latents"] == 3 and result["cache_counts"]["encoded_texts"] == 3
    for key in ("raw_vae_images_per_s", "raw_t5_captions_per_s", "raw_images_per_s", "cache_images_per_s"):
        assert result[key] > 0, key
    raw = 1 / (1 / result["raw_vae_images_per_s"] + 1 / result["raw_t5_captions_per_s"])
    assert result["raw_images_per_s"] == pytest.approx(raw)
    assert result["ratio"] == pytest.approx(result["cache_images_per_s"] / result["raw_images_per_s"])
    assert result["cache_images_per_s_end_to_end"] <= result["cache_images_per_s"]
    assert {"scan", "latents", "texts", "load_vae", "load_t5"} <= result["cache_timings_s"].keys()
