"""Batches of cached features for the training loop.

One batch holds one aspect-ratio bucket (the sampler sees to that), so latents stack directly;
captions were stored trimmed to their used tokens and are padded here to the longest in the batch,
with the attention mask marking the padding (the transformer ignores masked tokens, so this equals
padding to 120 as the pipeline does, at a fraction of the cross-attention cost).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .cache import CacheIndex, read_features
from .data.buckets import micro_conditions


class CacheCorruptedError(RuntimeError):
    """A cache file disappeared or changed after the cache was built."""


class CachedFeatures(Dataset):
    """Dataset over a CacheIndex: item i -> dict of tensors for one example."""

    def __init__(self, index: CacheIndex):
        self.records = index.records
        null = read_features(index.null_file)
        if null is None:
            raise CacheCorruptedError(f"null-caption embedding {index.null_file} is missing or corrupt; run `pixart-tune cache` again")
        self.null = null

    def __len__(self) -> int:
        return len(self.records)

    @property
    def buckets(self) -> list[str]:
        return [r.bucket for r in self.records]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.records[i]
        latent, text = read_features(r.latent_file), read_features(r.text_file)
        if latent is None or text is None:
            raise CacheCorruptedError(
                f"cache file for {r.key} is missing or corrupt ({r.latent_file if latent is None else r.text_file}); "
                "run `pixart-tune cache` again to rebuild it"
            )
        resolution, aspect_ratio = micro_conditions((r.height, r.width))
        return {
            "mean": latent["mean"],  # (4, h, w)
            "std": latent["std"],  # (4, h, w)
            "embeds": text["embeds"],  # (L, C)
            "mask": text["mask"],  # (L,)
            "resolution": torch.tensor(resolution, dtype=torch.float32),  # (2,) = (height, width)
            "aspect_ratio": torch.tensor([aspect_ratio], dtype=torch.float32),  # (1,) = height / width
        }


def pad_text(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (L_i, C) embeddings to (B, L_max, C) with a (B, L_max) mask."""
    length = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros((len(embeds), length, embeds[0].shape[1]))
    mask = masks[0].new_zeros((len(embeds), length))
    for i, (e, m) in enumerate(zip(embeds, masks)):
        out[i, : e.shape[0]] = e
        mask[i, : m.shape[0]] = m
    return out, mask


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    embeds, mask = pad_text([x["embeds"] for x in items], [x["mask"] for x in items])
    batch = {k: torch.stack([x[k] for x in items]) for k in ("mean", "std", "resolution", "aspect_ratio")}
    return {**batch, "embeds": embeds, "mask": mask}
