"""One training step's loss: a batch of cached features -> per-sample losses, exactly as every step runs it.

`LossFn` re-samples the VAE posterior, drops captions to T5("") for classifier-free guidance, noises
the latents (objective.py) and calls the transformer with the bucket's micro-conditions. It is shared
by the trainer, the evaluation helper and the benchmark, so what is measured is what trains.
`sample_generators` gives each sample its own RNG, keyed by its place in the run, so that a resumed
run, or one on more processes, draws the same noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .models import load_scheduler_config
from .objective import PixArtObjective
from .speed import attention_context


def sample_generators(seed: int, step: int, micro: int, first: int, count: int, device) -> list[torch.Generator]:
    """One RNG per sample, keyed by (seed, step, micro-batch, position in the GLOBAL batch).

    Noise, timesteps, posterior samples and caption dropout depend only on these numbers, so a
    resumed run draws what an uninterrupted one would, and 2 processes of batch B draw what 1
    process of batch 2B draws (rank r holds global positions r*B .. r*B+B-1)."""
    gens = []
    for position in range(first, first + count):
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + step * 10_007 + micro * 101 + position) % (2**63 - 1))
        gens.append(g)
    return gens


def _vae_scaling_factor(base: str, revision=None) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(base, subfolder="vae", revision=revision).get("scaling_factor", 0.18215))


def vlb_weight(cfg: Config) -> float:
    """train.vlb_weight, or its per-method default (see TrainConfig)."""
    if cfg.train.vlb_weight is not None:
        return cfg.train.vlb_weight
    return 1.0 if cfg.train.method == "full" else 0.0


class LossFn:
    """Per-sample loss of one batch of cached features: the computation every step runs.

    Shared by the trainer, the evaluation helper and the benchmark, so that what is measured is
    exactly what trains. Randomness comes from one generator per sample (see sample_generators).
    """

    def __init__(self, cfg: Config, base: str, transformer, null: dict, device, caption_dropout=None):
        t = cfg.train
        self.objective = PixArtObjective(
            load_scheduler_config(base, cfg.model.revision), snr_gamma=t.snr_gamma,
            noise_offset=t.noise_offset, vlb_weight=vlb_weight(cfg),
        ).to(device)  # fmt: skip
        self.scaling = _vae_scaling_factor(base, cfg.model.revision)
        self.micro_cond = bool(getattr(transformer, "use_additional_conditions", False))
        self.null = {k: v.to(device) for k, v in null.items()}
        self.caption_dropout = t.caption_dropout if caption_dropout is None else caption_dropout
        self.dtype = transformer.dtype
        self.attention = t.attention

    def __call__(self, model, batch: dict[str, torch.Tensor], gens: list[torch.Generator]) -> torch.Tensor:
        mean, std = batch["mean"], batch["std"]  # (B, 4, h, w) cached VAE posterior
        # Re-sample the posterior, then scale as the pipeline's decoder expects.
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g, device=mean.device) for g in gens])
        latents = (mean + std * eps) * self.scaling
        drop = torch.stack([torch.rand((), generator=g, device=mean.device) for g in gens]) < self.caption_dropout
        embeds, mask = batch["embeds"], batch["mask"]  # (B, L, 4096), (B, L)
        if self.caption_dropout > 0:
            embeds, mask = _drop_captions(embeds, mask, self.null, drop)
        x_t, noise, timesteps = self.objective.sample(latents, gens)
        if self.micro_cond:  # 1024-MS: the bucket's (h, w) and h/w, as the pipeline feeds at inference
            cond = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
        else:
            cond = {"resolution": None, "aspect_ratio": None}
        with attention_context(self.attention):
            out = model(
                hidden_states=x_t.to(self.dtype), encoder_hidden_states=embeds.to(self.dtype),
                encoder_attention_mask=mask, timestep=timesteps, added_cond_kwargs=cond, return_dict=False,
            )[0]  # (B, 8, h, w): eps || variance interpolation
        return self.objective.loss(out, latents, x_t, noise, timesteps)


def _drop_captions(embeds, mask, null, drop: torch.Tensor):
    """Replace the captions where `drop` is set by the cached T5("") (classifier-free guidance).

    embeds (B, L, D), mask (B, L), null {"embeds": (n, D), "mask": (n,)}, drop (B,) bool. No host
    sync (no branch on `drop`): both sides are padded to max(L, n) with masked zeros and selected per
    sample; masked tokens are ignored by the cross-attention, so the padding changes nothing.
    """
    length, n = max(embeds.shape[1], null["embeds"].shape[0]), null["embeds"].shape[0]
    e, m = F.pad(embeds, (0, 0, 0, length - embeds.shape[1])), F.pad(mask, (0, length - mask.shape[1]))
    null_e = F.pad(null["embeds"].to(e.dtype), (0, 0, 0, length - n))
    null_m = F.pad(null["mask"].to(m.dtype), (0, length - n))
    return torch.where(drop[:, None, None], null_e, e), torch.where(drop[:, None], null_m, m)
