"""The training loop: cached features -> PixArt transformer (LoRA or full) -> run directory.

Reads top to bottom: set up the run, build or reuse the feature cache, load the transformer,
choose what trains, then one loop of optimizer steps. accelerate is the engine, so the same code
runs on one process or several (`accelerate launch -m pixart_tune train RECIPE`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import build_cache
from .config import Config, load_config, save_config
from .features import CachedFeatures, collate
from .models import DTYPES, load_scheduler_config, load_transformer, resolve_base
from .objective import PixArtObjective


def _step_generator(seed: int, step: int, rank: int, micro: int, device) -> torch.Generator:
    """A fresh RNG per (step, rank, micro-batch): noise, timesteps and dropout depend only on these
    numbers, so a resumed run draws exactly what an uninterrupted one would have drawn."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 1_009 + rank * 101 + micro) % (2**63))
    return g


def _vae_scaling_factor(base: str, revision=None) -> float:
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(base, subfolder="vae", revision=revision).get("scaling_factor", 0.18215))


def _batches(dataset: CachedFeatures, cfg: Config, rank: int, world_size: int):
    """Endless stream of collated batches, one bucket per batch, this rank's share."""
    from .data.sampler import BucketBatchSampler

    sampler = BucketBatchSampler(dataset.buckets, cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
    for indices in sampler.forever():
        yield collate([dataset[i] for i in indices])


def _make_optimizer(params, cfg: Config):
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False)
    raise ValueError(f"train.optimizer {t.optimizer!r} is not available")


def _make_lr_schedule(optimizer, cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if t.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_final(model, accelerator, run_dir: Path, method: str) -> Path:
    """Write final/ atomically: a PEFT adapter folder (LoRA) or a diffusers transformer (full)."""
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def train(cfg: Config | str | Path, overrides: list[str] | dict | None = None, *, show_progress: bool = True) -> Path:
    """Train per the recipe and return the `final/` folder (PEFT adapter or full transformer)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides)
    elif overrides:
        raise ValueError("pass overrides with a recipe path, not with a Config object")
    t = cfg.train
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # Features: built once (on the main process), then reused by every rank and later runs.
    base = resolve_base(cfg.model.base)
    with accelerator.main_process_first():
        index = build_cache(cfg, base, accelerator.device, show_progress=show_progress and main)
    if main:
        print(index.summary())
    if not index.records:
        raise RuntimeError(f"no usable examples in {cfg.data.path}; see {index.cache_dir / 'skipped.jsonl'}")
    dataset = CachedFeatures(index)

    # The model, and the one place where LoRA-vs-full is decided.
    transformer = load_transformer(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    set_seed(cfg.seed)  # here, right before the LoRA init draws: nothing above may shift the RNG
    if t.method == "lora":
        from .lora import add_lora

        model = add_lora(transformer, cfg.lora, base_model=base)  # the tiny kit records its folder
    else:
        model = transformer.requires_grad_(True)
    # Trainable weights are fp32 masters whatever the frozen weights' dtype; autocast does the rest.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, cfg)
    lr_schedule = _make_lr_schedule(optimizer, cfg)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)

    step_fn = LossFn(cfg, base, transformer, dataset.null, accelerator.device)
    batches = _batches(dataset, cfg, accelerator.process_index, accelerator.num_processes)

    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
    bar = tqdm(total=t.steps, desc="training", disable=not (show_progress and main))
    model.train()
    started, samples = time.perf_counter(), 0
    for step in range(t.steps):
        step_loss = 0.0
        for micro in range(t.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            g = _step_generator(cfg.seed, step, accelerator.process_index, micro, accelerator.device)
            with accelerator.accumulate(model):
                loss = step_fn(model, batch, g).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                lr_schedule.step() if accelerator.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().float().item() / t.grad_accum
            samples += batch["mean"].shape[0] * accelerator.num_processes
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step + 1}; lower train.lr or use bf16/fp32")
        lr = lr_schedule.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if metrics and ((step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps):
            rate = samples / (time.perf_counter() - started)
            metrics.write(json.dumps({"step": step + 1, "loss": step_loss, "lr": lr, "samples_per_s": rate}) + "\n")
            metrics.flush()
    bar.close()

    accelerator.wait_for_everyone()
    final = run_dir / "final"
    if main:
        final = _save_final(model, accelerator, run_dir, t.method)
        metrics.close()
        what = "LoRA adapter (PEFT)" if t.method == "lora" else "full transformer (diffusers)"
        print(f"wrote {what} to {final}; config {run_dir / 'config.yaml'}; metrics {run_dir / 'metrics.jsonl'}")
    accelerator.end_training()
    return final


class LossFn:
    """Per-sample loss of one batch of cached features: the computation every step runs.

    Shared by the trainer, the evaluation helper and the benchmark, so that what is measured is
    exactly what trains. Randomness (posterior sample, caption dropout, t, noise) comes from `g`.
    """

    def __init__(self, cfg: Config, base: str, transformer, null: dict, device, caption_dropout=None):
        t = cfg.train
        self.objective = PixArtObjective(
            load_scheduler_config(base, cfg.model.revision), snr_gamma=t.snr_gamma,
            noise_offset=t.noise_offset, vlb_weight=t.vlb_weight,
        )  # fmt: skip
        self.scaling = _vae_scaling_factor(base, cfg.model.revision)
        self.micro_cond = bool(getattr(transformer, "use_additional_conditions", False))
        self.null = {k: v.to(device) for k, v in null.items()}
        self.caption_dropout = t.caption_dropout if caption_dropout is None else caption_dropout
        self.dtype = transformer.dtype

    def __call__(self, model, batch: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        # Re-sample the cached VAE posterior, then scale as the pipeline's decoder expects.
        eps = torch.randn(batch["mean"].shape, generator=g, device=batch["mean"].device)
        latents = (batch["mean"] + batch["std"] * eps) * self.scaling  # (B, 4, h, w)
        embeds, mask = _drop_captions(batch["embeds"], batch["mask"], self.null, self.caption_dropout, g)
        x_t, noise, timesteps = self.objective.sample(latents, generator=g)
        if self.micro_cond:  # 1024-MS: the bucket's (h, w) and h/w, as the pipeline feeds at inference
            cond = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
        else:
            cond = {"resolution": None, "aspect_ratio": None}
        out = model(
            hidden_states=x_t.to(self.dtype), encoder_hidden_states=embeds.to(self.dtype),
            encoder_attention_mask=mask, timestep=timesteps, added_cond_kwargs=cond, return_dict=False,
        )[0]  # (B, 8, h, w): eps || variance interpolation
        return self.objective.loss(out, latents, x_t, noise, timesteps)


def _drop_captions(embeds, mask, null, p: float, g: torch.Generator):
    """With probability p per sample, replace the caption by the cached T5("") (classifier-free guidance)."""
    if p <= 0:
        return embeds, mask
    drop = torch.rand(embeds.shape[0], generator=g, device=embeds.device) < p
    if not drop.any():
        return embeds, mask
    length = max(embeds.shape[1], null["embeds"].shape[0])
    e = embeds.new_zeros((embeds.shape[0], length, embeds.shape[2]))
    m = mask.new_zeros((mask.shape[0], length))
    e[:, : embeds.shape[1]], m[:, : mask.shape[1]] = embeds, mask
    n = null["embeds"].shape[0]
    e[drop] = 0
    m[drop] = 0
    e[drop, :n] = null["embeds"].to(e.dtype)
    m[drop, :n] = null["mask"].to(m.dtype)
    return e, m
