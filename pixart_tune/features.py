"""Batches of cached features for the training loop.

Every cached variant of an example (crop x flip, see cache/keys.py) is one item: with data.flip an
epoch shows each image once as it is and once mirrored, with data.crop_variants=N each of N crops.
One batch holds one aspect-ratio bucket (the sampler sees to that), so latents stack directly;
captions were stored trimmed to their used tokens and are padded here to the longest in the batch,
with the attention mask marking the padding (the transformer ignores masked tokens, so this equals
padding to 120 as the pipeline does, at a fraction of the cross-attention cost).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cache import CacheIndex, read_features
from .data.buckets import micro_conditions


class CacheCorruptedError(RuntimeError):
    """A cache file disappeared or changed after the cache was built."""


class CachedFeatures(Dataset):
    """Dataset over a CacheIndex: item i -> dict of tensors for one (example, variant)."""

    def __init__(self, index: CacheIndex):
        self.records = index.records
        # (record, variant) per item, record-major: items of one example are adjacent.
        self.items = [(r, v) for r, rec in enumerate(self.records) for v in range(len(rec.latent_files))]
        null = read_features(index.null_file)
        if null is None:
            raise CacheCorruptedError(f"null-caption embedding {index.null_file} is missing or corrupt; run `pixart-tune cache` again")
        self.null = null

    def __len__(self) -> int:
        return len(self.items)

    @property
    def buckets(self) -> list[str]:
        return [self.records[r].bucket for r, _ in self.items]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r, v = self.items[i]
        rec = self.records[r]
        latent_file = rec.latent_files[v]
        latent, text = read_features(latent_file), read_features(rec.text_file)
        if latent is None or text is None:
            bad = latent_file if latent is None else rec.text_file
            _move_aside(bad)
            raise CacheCorruptedError(
                f"cache file for {rec.key} is missing or corrupt ({bad}); it was moved aside, so building "
                "the cache again (`pixart-tune cache RECIPE`, or train again) re-encodes it"
            )
        resolution, aspect_ratio = micro_conditions((rec.height, rec.width))
        return {
            "mean": latent["mean"],  # (4, h, w)
            "std": latent["std"],  # (4, h, w)
            "embeds": text["embeds"],  # (L, C)
            "mask": text["mask"],  # (L,)
            "resolution": torch.tensor(resolution, dtype=torch.float32),  # (2,) = (height, width)
            "aspect_ratio": torch.tensor([aspect_ratio], dtype=torch.float32),  # (1,) = height / width
        }


def _move_aside(path: str) -> None:
    """Rename a damaged cache file to *.corrupt (kept for inspection; the next build re-creates it)."""
    try:
        os.replace(path, Path(path).with_name(Path(path).name + ".corrupt"))
    except OSError:  # already gone, or moved by another process
        pass


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
