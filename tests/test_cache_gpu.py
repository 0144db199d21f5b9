"""The cache on a CUDA device: the pipelined path (pinned non-blocking copies, results handed over
one batch late, background writes) stores what the encoders compute. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_cache import config, make_dataset

from pixart_tune.cache import build_cache, read_features
from pixart_tune.data.buckets import bucket_table, fit_to_bucket

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@torch.no_grad()
def test_cuda_cache_matches_direct_encoding(tmp_path, tiny_base):
    from pixart_tune.cache.encode import TextEncoder
    from pixart_tune.models import load_vae

    data = make_dataset(tmp_path / "data", 7)
    cfg = config(data, tmp_path / "cache", tiny_base, flip=True, num_workers=2, encode_batch_size=3)
    index = build_cache(cfg, str(tiny_base), "cuda", show_progress=False)
    assert index.counts["encoded_latents"] == 14 and index.counts["used"] == 7

    vae = load_vae(str(tiny_base)).to("cuda").eval()
    texts = []
    TextEncoder(str(tiny_base), cfg, torch.device("cuda")).encode(
        [(data / f"img{i}.txt").read_text().lower() for i in range(7)], lambda _, f: texts.extend(f), 7
    )
    for record in index.records:
        i = int(record.key[3:-4])
        image = Image.open(data / record.key).convert("RGB")
        for flip, path in zip((False, True), record.latent_files):
            pixels, _ = fit_to_bucket(image, bucket_table(256)[record.bucket], flip=flip)
            x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().cuda() / 127.5 - 1.0
            dist = vae.encode(x).latent_dist
            stored = read_features(path)
            # cuDNN runs fp32 convolutions in TF32 by default and picks its algorithm per batch size, so
            # a batch of 3 and a batch of 1 differ by ~1e-3 here and there (measured on an H100: 9 of
            # 3744 values above 1e-3, largest 1.8e-3). A wrong image, crop or flip differs by ~0.1-1.
            for name, direct in (("mean", dist.mean[0].cpu()), ("std", dist.std[0].cpu())):
                torch.testing.assert_close(stored[name], direct, rtol=1e-2, atol=5e-3)
                assert float((stored[name] - direct).abs().mean()) < 5e-4, name
        stored = read_features(record.text_file)
        torch.testing.assert_close(stored["embeds"], texts[i]["embeds"].cpu(), rtol=1e-3, atol=1e-3)
        assert torch.equal(stored["mask"], texts[i]["mask"])


def test_t5_8bit_on_cuda_runs_on_the_gpu(tiny_base):
    pytest.importorskip("bitsandbytes")
    from pixart_tune.cache.encode import TextEncoder
    from pixart_tune.config import load_config

    cfg = load_config(None, {"model.base": str(tiny_base), "data.t5_quantization": "8bit"})
    encoder = TextEncoder(str(tiny_base), cfg, torch.device("cuda"))
    assert encoder.device.type == "cuda", "quantized T5 must sit on the GPU, not fall back to the CPU"
    out = []
    encoder.encode(["a photo of a cat"], lambda _, f: out.extend(f), 1)
    assert out[0]["embeds"].isfinite().all()
