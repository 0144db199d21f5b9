"""How close the cache build comes to the raw speed of its encoders, on one device.

    python -m pixart_tune.bench_cache --base /path/to/hub-layout-folder --device cuda --n 256

`measure_cache_throughput` writes n synthetic JPEG photos (varied aspect ratios, unique captions),
then measures in one process:
  raw    the VAE encoding bucket-sized tensors already on the device, batched by bucket exactly as
         the cache batches them, plus T5 encoding the captions (tokenized beforehand); after a
         warm-up of every shape; images/s = n / (VAE seconds + T5 seconds)
  cache  build_cache on the folder into a fresh cache folder: reading, hashing, decoding in
         workers, encoding, writing. images/s over the whole build, and over the build minus the
         two model loads (which the raw figure does not contain either)
and reports both and their ratio (`ratio`: without model loading; `ratio_end_to_end`: with it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# h/w of the synthetic photos: portrait, landscape and square, as in a real photo collection
RATIOS = (1.0, 0.75, 4 / 3, 0.5625, 16 / 9, 2 / 3, 1.5, 0.8, 1.25, 0.5, 2.0)
WORDS = (
    "a photo of the cat dog person woman man child street city beach mountain forest river sunset night "
    "red blue green golden old young small large wooden stone glass portrait close-up landscape detailed "
    "soft light in on with under near behind painting watercolor sketch cinematic bright dark vivid"
).split()


def write_synthetic_photos(folder: str | Path, n: int, resolution: int, seed: int = 0) -> list[tuple[int, int]]:
    """n JPEGs (+ .txt captions) of about 1.25x the bucket area, cycling through RATIOS; returns (h, w)s."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(seed), random.Random(seed)
    sizes = []
    for i in range(n):
        ratio, area = RATIOS[i % len(RATIOS)], (1.25 * resolution) ** 2
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        # Smooth shapes plus grain: decodes and compresses like a photo, unlike flat or pure noise.
        base = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
        pixels = np.asarray(base.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        caption = " ".join(words.choice(WORDS) for _ in range(words.randint(8, 40)))
        (folder / f"{i:05d}.txt").write_text(f"{caption}, number {i}", encoding="utf-8")
        sizes.append((h, w))
    return sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _raw_vae_seconds(vae, device, sizes, resolution: int, batch_size: int) -> float:
    """VAE time for the cache's batches: per bucket, full batches and one partial, inputs on the device."""
    from .data.buckets import assign_bucket, bucket_table

    table = bucket_table(resolution)
    per_bucket = Counter(assign_bucket(h, w, resolution) for h, w in sizes)
    batches = []
    for bucket, count in per_bucket.items():
        full, rest = divmod(count, batch_size)
        batches += [(table[bucket], batch_size)] * full + ([(table[bucket], rest)] if rest else [])
    inputs = {
        (hw, b): torch.rand((b, 3, *hw), device=device).mul_(2).sub_(1).to(vae.dtype) for hw, b in set(batches)
    }
    for x in inputs.values():  # warm-up: every shape once
        _ = vae.encode(x).latent_dist
    _sync(device)
    started = time.perf_counter()
    for hw, b in batches:
        dist = vae.encode(inputs[(hw, b)]).latent_dist
        torch.cat([dist.mean, dist.std], dim=1)
    _sync(device)
    return time.perf_counter() - started


@torch.no_grad()
def _raw_t5_seconds(tokenizer, model, captions: list[str], max_tokens: int, batch_size: int) -> float:
    device = next(model.parameters()).device
    batches = []
    for i in range(0, len(captions), batch_size):
        tok = tokenizer(captions[i : i + batch_size], max_length=max_tokens, padding="max_length", truncation=True,
                        add_special_tokens=True, return_tensors="pt")  # fmt: skip
        batches.append((tok.input_ids.to(device), tok.attention_mask.to(device)))
    model(batches[0][0], attention_mask=batches[0][1])  # warm-up
    _sync(device)
    started = time.perf_counter()
    for ids, mask in batches:
        model(ids, attention_mask=mask)
    _sync(device)
    return time.perf_counter() - started


def measure_cache_throughput(
    base: str,
    device: str,
    n_images: int,
    resolution: int = 1024,
    batch_size: int = 8,
    workers: int = 4,
    t5_dtype: str = "bf16",
    *,
    weight_dtype: str = "fp32",
    seed: int = 0,
) -> dict:
    """Raw encoder images/s vs build_cache images/s on `device` (see the module docstring)."""
    from .cache import build_cache
    from .config import load_config
    from .models import DTYPES, load_text_encoder, load_tokenizer, load_vae, resolve_base

    base, dev = resolve_base(base), torch.device(device)
    with tempfile.TemporaryDirectory(prefix="pixart-bench-cache-") as tmp:
        folder = Path(tmp) / "photos"
        sizes = write_synthetic_photos(folder, n_images, resolution, seed)
        captions = [(folder / f"{i:05d}.txt").read_text(encoding="utf-8").lower() for i in range(n_images)]
        cfg = load_config(None, {
            "model.base": base, "model.weight_dtype": weight_dtype, "data.path": str(folder),
            "data.cache_dir": str(Path(tmp) / "cache"), "data.resolution": resolution,
            "data.encode_batch_size": batch_size, "data.num_workers": workers, "data.t5_dtype": t5_dtype,
            "output_dir": str(Path(tmp) / "run"),
        })  # fmt: skip

        vae = load_vae(base, DTYPES[weight_dtype]).to(dev).eval().requires_grad_(False)
        vae_s = _raw_vae_seconds(vae, dev, sizes, resolution, batch_size)
        del vae
        _free(dev)
        tokenizer, t5 = load_tokenizer(base), load_text_encoder(base, DTYPES[t5_dtype]).to(dev)
        t5_s = _raw_t5_seconds(tokenizer, t5, captions, cfg.data.max_tokens, batch_size)
        del t5
        _free(dev)

        _sync(dev)
        started = time.perf_counter()
        index = build_cache(cfg, base, dev, show_progress=False)
        _sync(dev)
        build_s = time.perf_counter() - started
    loads = index.timings.get("load_vae", 0.0) + index.timings.get("load_t5", 0.0)
    raw = n_images / (vae_s + t5_s)
    cache_e2e, cache = n_images / build_s, n_images / (build_s - loads)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "n_images": n_images, "resolution": resolution, "batch_size": batch_size, "workers": workers,
        "t5_dtype": t5_dtype, "weight_dtype": weight_dtype,
        "raw_vae_images_per_s": n_images / vae_s, "raw_t5_captions_per_s": n_images / t5_s,
        "raw_images_per_s": raw, "cache_images_per_s": cache, "cache_images_per_s_end_to_end": cache_e2e,
        "ratio": cache / raw, "ratio_end_to_end": cache_e2e / raw, "model_load_s": loads,
        "cache_timings_s": dict(index.timings), "cache_counts": dict(index.counts),
    }  # fmt: skip


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="embedded:tiny", help="Hub-layout folder, Hub id or embedded:tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=256, help="number of synthetic images")
    p.add_argument("--resolution", type=int, default=1024, choices=(256, 512, 1024))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--t5-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--weight-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    a = p.parse_args(argv)
    result = measure_cache_throughput(a.base, a.device, a.n, a.resolution, a.batch_size, a.workers, a.t5_dtype,
                                      weight_dtype=a.weight_dtype)  # fmt: skip
    print(json.dumps(result, indent=2))
    print(f"cache {result['cache_images_per_s']:.1f} img/s vs raw {result['raw_images_per_s']:.1f} img/s: "
          f"{100 * result['ratio']:.0f}% ({100 * result['ratio_end_to_end']:.0f}% with model loading)")  # fmt: skip


if __name__ == "__main__":
    main()
