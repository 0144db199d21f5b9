"""PixArt-alpha's training objective, in one place beside the loop.

PixArt predicts 8 channels: eps (4) and a variance interpolation v (4) in [-1, 1] (learned sigma,
IDDPM). The loss is eps-MSE on the first half, optionally weighted by min-SNR-gamma, plus an optional
VLB term that trains only the variance half (eps is detached inside it, as in the official trainer).
Everything here runs in fp32, whatever the model's compute dtype.
"""

from __future__ import annotations

import math

import torch


def linear_alphas_cumprod(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, **_) -> torch.Tensor:
    """alpha-bar_t of PixArt's linear beta schedule, float64 for the VLB arithmetic."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of a Gaussian discretised into 256 bins over [-1, 1] (IDDPM's decoder term at t=0)."""

    def cdf(z):  # fast, accurate approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


class PixArtObjective:
    """Noise, timesteps and loss for one batch of cached latents."""

    def __init__(self, scheduler_config: dict, *, snr_gamma=None, noise_offset=0.0, vlb_weight=0.0):
        acp = linear_alphas_cumprod(**{k: scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end")})
        if scheduler_config.get("beta_schedule", "linear") != "linear":
            raise ValueError(f"only PixArt's linear beta schedule is supported, got {scheduler_config['beta_schedule']}")
        self.num_timesteps = acp.shape[0]
        acp_prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
        betas = 1.0 - acp / acp_prev
        posterior_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.alphas_cumprod = acp
        self.log_betas = torch.log(betas)
        # log of the posterior variance, with the t=0 entry (zero) replaced by t=1's, as IDDPM does.
        self.posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        self.coef_x0 = betas * torch.sqrt(acp_prev) / (1.0 - acp)
        self.coef_xt = (1.0 - acp_prev) * torch.sqrt(1.0 - betas) / (1.0 - acp)
        self.snr_gamma, self.noise_offset, self.vlb_weight = snr_gamma, noise_offset, vlb_weight

    def to(self, device) -> PixArtObjective:
        """Keep the schedule tables (float64, one entry per timestep) on `device`. Left on the CPU, every
        step would copy them over to index them with the GPU's timesteps, and such a copy from pageable
        memory waits for the GPU to finish all queued work, so the host loses its lead every step."""
        for name in ("alphas_cumprod", "log_betas", "posterior_log_var", "coef_x0", "coef_xt"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, 1, 1) to broadcast against `like`."""
        return table.to(like.device)[t].float().view(-1, 1, 1, 1)

    def sample(self, latents: torch.Tensor, gens: list[torch.Generator]):
        """Draw t ~ U{0..T-1} and noise, one generator per sample; return (x_t, noise, t).

        latents: (B, 4, h, w). Per-sample generators make every draw independent of batch layout."""
        dev, shape = latents.device, latents.shape[1:]
        t = torch.stack([torch.randint(0, self.num_timesteps, (), generator=g, device=dev) for g in gens])
        noise = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
        if self.noise_offset:  # a per-channel constant shift: lets the model learn overall brightness
            offset = torch.stack([torch.randn((shape[0], 1, 1), generator=g, device=dev) for g in gens])
            noise = noise + self.noise_offset * offset
        acp = self._at(self.alphas_cumprod, t, latents)
        x_t = acp.sqrt() * latents.float() + (1.0 - acp).sqrt() * noise
        return x_t, noise, t

    def loss(self, model_output: torch.Tensor, latents, x_t, noise, t) -> torch.Tensor:
        """Per-sample loss (B,) in fp32. model_output: (B, 8, h, w) = eps || v."""
        out = model_output.float()
        eps, v = out.chunk(2, dim=1) if out.shape[1] == 2 * latents.shape[1] else (out, None)
        mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            acp = self.alphas_cumprod.to(t.device)[t].float()
            snr = acp / (1.0 - acp)
            mse = mse * torch.clamp(snr, max=self.snr_gamma) / snr  # min-SNR-gamma for eps targets
        if self.vlb_weight and v is not None:
            mse = mse + self.vlb_weight * self.vlb(eps.detach(), v, latents.float(), x_t, t)
        return mse

    def vlb(self, eps, v, x0, x_t, t) -> torch.Tensor:
        """IDDPM's variational bound term (bits per dim), which trains only the variance head v."""
        min_log = self._at(self.posterior_log_var, t, x0)
        max_log = self._at(self.log_betas, t, x0)
        frac = (v + 1.0) / 2.0
        model_log_var = frac * max_log + (1.0 - frac) * min_log
        acp = self._at(self.alphas_cumprod, t, x0)
        pred_x0 = (x_t - (1.0 - acp).sqrt() * eps) / acp.sqrt()
        c0, ct = self._at(self.coef_x0, t, x0), self._at(self.coef_xt, t, x0)
        model_mean = c0 * pred_x0 + ct * x_t
        true_mean = c0 * x0 + ct * x_t
        kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
