"""The feature cache: VAE posteriors and T5 embeddings, computed once and stored on disk.

Content-addressed (cache/keys.py): a latent file's name is a hash of the image bytes, the variant
(crop, flip), the resolution table and the VAE's identity and dtype; a text file's name is a hash of
the processed caption and the text encoder's identity, dtype, quantization, max tokens and caption
processing. So adding an image encodes only that image, editing a caption re-encodes only that
caption, and changing the VAE or the resolution invalidates the latents and nothing else.

Layout under the cache folder (data.cache_dir, default <data.path>/.pixart_tune_cache):
    latents/<k[:2]>/<k>.safetensors   mean, std: (4, h, w) fp32, the posterior (re-sampled each
                                      step); header: bucket, variant, orig_hw, crop_top_left
    text/<k[:2]>/<k>.safetensors      embeds: (L, C) bf16 or fp32, mask: (L,), trimmed to the L tokens used
    null/<k>.safetensors              T5("") with its mask, for caption dropout
    rejected/<k[:2]>/<k>.json         an image that cannot be used, and why (decided once)
    skipped.jsonl                     one line per example not used: {"origin", "reason"}
Every file is written to a temporary name and renamed; each feature file carries a checksum of its
tensors. A truncated file is found by the next build and re-encoded; `verify=True` (or reading it in
training) checks the checksum too.

    from pixart_tune.cache import build_cache
    index = build_cache(cfg, base, "cuda", rank=r, world_size=n, barrier=accelerator.wait_for_everyone)
    print(index.summary())
"""

from .build import build_cache
from .keys import CACHE_FORMAT, CacheKeys, Variant, variants
from .store import CacheIndex, Record, default_cache_dir, read_features, read_header, write_features

__all__ = [
    "CACHE_FORMAT",
    "CacheIndex",
    "CacheKeys",
    "Record",
    "Variant",
    "build_cache",
    "default_cache_dir",
    "read_features",
    "read_header",
    "variants",
    "write_features",
]
