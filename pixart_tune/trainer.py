"""The training loop: cached features -> PixArt transformer (LoRA or full) -> run directory.

Reads top to bottom: set up the run, build or reuse the feature cache, load the transformer and
decide once what trains, then one loop of optimizer steps with logging, validation, checkpoints and
guards. accelerate is the engine, so the same code runs on one process or several
(`accelerate launch -m pixart_tune train RECIPE`), with DDP or FSDP as accelerate is configured.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .cache import build_cache
from .checkpoint import full_state, is_sharded, load_checkpoint, resolve_resume, save_checkpoint, save_rng
from .config import Config, load_config, save_config
from .data.sampler import BucketBatchSampler
from .data.sources import DataError
from .features import CachedFeatures
from .loss import LossFn, sample_generators
from .models import DTYPES, load_transformer, resolve_base
from .optim import make_lr_schedule, make_optimizer
from .prefetch import BatchPrefetcher
from .speed import apply_compile, apply_speed_paths, resolve_attention
from .step_profile import step_profiler


class StopVote:
    """Whether any process has seen Ctrl-C, agreed by all without stopping the GPU's run-ahead.

    Processes may see the signal a step apart, and they must stop after the same step (the checkpoint
    save is collective). Each step every process adds its flag to an all-reduce on the device; the
    sum is copied to pinned host memory behind an event and read one step later. Waiting on that event
    waits for the previous step only, while this step's kernels stay queued: a plain `.item()` on the
    sum would drain the GPU every step and let the host's launch latency show (on CUDA; on CPU the
    reduce is synchronous anyway). All processes read the same sum, so they stop after the same step,
    one step after the first saw the signal.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.on_cuda = accelerator.device.type == "cuda"
        self.host = torch.zeros((), pin_memory=True) if self.on_cuda else None
        self.ready = torch.cuda.Event() if self.on_cuda else None
        self.last = None  # the previous step's sum (on the host, behind `ready`, on CUDA)

    def __call__(self, interrupted: bool) -> bool:
        stop = False
        if self.last is not None:
            if self.on_cuda:
                self.ready.synchronize()
            stop = self.last.item() > 0
        device = self.accelerator.device
        total = self.accelerator.reduce(torch.full((), float(interrupted), device=device), "sum")
        if self.on_cuda:
            self.host.copy_(total, non_blocking=True)
            self.ready.record()
            total = self.host
        self.last = total
        return stop


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved; `resume=latest` continues."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}; continue with resume=latest")
        self.checkpoint = checkpoint


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def prepare_model(cfg: Config, base: str):
    """Load the transformer and decide, once, what trains. Returns (model, transformer).

    LoRA: frozen base (model.weight_dtype) + peft adapter. Full: every weight trains except the
    prefixes in train.freeze. Trainable weights are fp32 masters whatever the base dtype; autocast
    runs the matmuls in bf16.
    """
    from accelerate.utils import set_seed

    t = cfg.train
    transformer = load_transformer(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    set_seed(cfg.seed)  # here, right before the LoRA init draws: nothing above may shift the RNG
    if t.method == "lora":
        from .lora import add_lora

        model = add_lora(transformer, cfg.lora, base_model=base)  # the tiny kit records its folder
        if t.fused_lora:
            from .lora_fused import fuse_lora_linears

            fuse_lora_linears(model)
        if t.fp8:  # (needs fused_lora: config) fp8 copies of the busiest frozen base weights, which the
            # fused LoRA linears use, and the feed-forward's two linears and GELU as one function
            from .fp8 import FP8_LAYERS, apply_fp8
            from .lora_ff import fuse_feed_forwards

            if not apply_fp8(model):
                raise ValueError(f"train.fp8: no LoRA on the layers it speeds up ({', '.join(FP8_LAYERS)} of each "
                                 "block); add attention or ff to lora.targets, or set train.fp8=false")  # fmt: skip
            fuse_feed_forwards(model)
    else:
        model = transformer.requires_grad_(True)
        for name, module in model.named_modules():
            if any(name == f or name.startswith(f + ".") for f in t.freeze):
                module.requires_grad_(False)
    apply_speed_paths(model, t)  # FA4, the folded cross-attention, the bf16 stream, the quack GEMMs
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, transformer


def _save_final(model, transformer, run_dir: Path, method: str, ema, main: bool) -> Path:
    """Write final/ atomically: a PEFT adapter (LoRA) or a diffusers transformer (full).

    With EMA on, final/ holds the EMA weights (what the official trainer ships) and final-raw/
    the last live weights. Every process calls it; `main` writes, and under FSDP the others take
    part in gathering the shards."""
    if not main and not is_sharded(model):
        return run_dir / "final"
    outputs = {"final": True} if ema is None else {"final-raw": False, "final": True}
    for name, use_ema in outputs.items():
        if ema is not None and use_ema:
            ema.swap()
        weights = full_state(model, trainable_only=method == "lora")
        if ema is not None and use_ema:
            ema.swap()
        if not main:
            continue
        with atomic_dir(run_dir / name, tmp=run_dir / f".{name}.tmp") as tmp:
            if method == "lora":  # peft picks the adapter's tensors out of `weights`; no embeddings are adapted
                model.save_pretrained(tmp, state_dict=weights, safe_serialization=True, save_embedding_layers=False)
            else:  # the layout of diffusers' save_pretrained: config.json + one safetensors file (2.4 GB in fp32)
                transformer.save_config(tmp)
                save_file(weights, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return run_dir / "final"


def _check_distributed(accelerator, cfg: Config) -> bool:
    """Refuse what is not checked under FSDP; returns whether the weights are sharded (FSDP2)."""
    if accelerator.distributed_type.name != "FSDP":
        return False
    if not accelerator.is_fsdp2:
        raise NotImplementedError(
            "pixart-tune supports FSDP2 only: set `fsdp_version: 2` in the accelerate config "
            "(recipes/accelerate/fsdp2.yaml is one) or pass --fsdp_version 2 to accelerate launch"
        )
    if cfg.train.method != "full":
        raise NotImplementedError(
            "FSDP is for the full fine-tune; a LoRA trains a few MB and its frozen base (1.2 GB in bf16) fits every "
            "GPU: launch LoRA runs with DDP (accelerate launch --multi_gpu --num_processes N ...)"
        )
    if cfg.train.optimizer != "adamw":
        raise NotImplementedError(
            f"train.optimizer={cfg.train.optimizer} is not supported under FSDP (its state is not sharded); "
            "use train.optimizer=adamw, whose state FSDP shards across the GPUs"
        )
    return True


def _forget_earlier_runs_settings() -> None:
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator whose settings
    differ from it, so a second train() in a process (a notebook, the benchmark) with another
    mixed_precision would fail. Each run's settings are its own: drop the earlier run's (the
    process group, in PartialState, stays). accelerate has no public call for this."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _init_trackers(accelerator, cfg: Config) -> None:
    if cfg.train.log_with == "tensorboard":
        flat = {f"{s}.{k}": str(v) for s, d in cfg.dump().items() if isinstance(d, dict) for k, v in d.items()}
        accelerator.init_trackers("pixart_tune", config=flat)


def train(cfg: Config | str | Path, overrides: list[str] | dict | None = None, *, show_progress: bool = True) -> Path:
    """Train per the recipe and return the `final/` folder (PEFT adapter or full transformer)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides)
    elif overrides:
        raise ValueError("pass overrides with a recipe path, not with a Config object")
    t = cfg.train
    run_dir = Path(cfg.output_dir)
    if t.mixed_precision == "fp16":
        warnings.warn("fp16 trains with loss scaling but PixArt is prone to overflow in fp16; prefer bf16", stacklevel=2)
    tensorboard = t.log_with == "tensorboard"
    _forget_earlier_runs_settings()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        # DDP: gradients live in its all-reduce buckets instead of being copied into and out of them
        # each step (2.4 GB of fp32 gradients for a full fine-tune).
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        # Our schedule counts optimizer steps; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard" if tensorboard else None, project_dir=str(run_dir / "logs") if tensorboard else None,
    )  # fmt: skip
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    sharded = _check_distributed(accelerator, cfg)
    resume_from = resolve_resume(cfg.resume, run_dir) if cfg.resume else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # `resume` says how this run started, not what it is: rerunning config.yaml starts afresh.
        save_config(cfg.model_copy(update={"resume": None}), run_dir / "config.yaml")

    attention = resolve_attention(t.attention, accelerator.device)  # config.yaml keeps `auto` for other machines
    if attention != t.attention:
        if main:
            print(f"train.attention={t.attention}: {attention} on this machine")
        cfg = cfg.model_copy(update={"train": t.model_copy(update={"attention": attention})})
        t = cfg.train
    if t.fp8:
        from .fp8 import scaled_mm_supported

        if not scaled_mm_supported(accelerator.device):
            warnings.warn(f"train.fp8: {accelerator.device} has no fp8 matmuls (they need an NVIDIA GPU of compute "
                          "capability 9.0+); the fp8 values are multiplied in fp32 instead: the same numerics, but "
                          "slower than train.fp8=false", stacklevel=2)  # fmt: skip
    base = resolve_base(cfg.model.base)
    # Every rank encodes its share of what is missing, then all read the same index from disk.
    index = build_cache(cfg, base, accelerator.device, show_progress=show_progress and main, rank=rank,
                        world_size=world, barrier=accelerator.wait_for_everyone)  # fmt: skip
    if main:
        print(index.summary())
    if not index.records:
        raise DataError(cfg.data.path, f"no usable examples: all {len(index.skipped)} skipped",
                        hint=f"Each file and its reason are in {index.cache_dir / 'skipped.jsonl'}; fix them, or set "
                             "data.path to another dataset.")  # fmt: skip
    dataset = CachedFeatures(index)
    validator = None
    if cfg.validation.prompts:
        from .validation import make_validator

        validator = make_validator(cfg, base, accelerator.device, main, sharded)

    model, transformer = prepare_model(cfg, base)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Fused AdamW on the GPU; under FSDP accelerate swaps in sharded params later, and those keep foreach.
    optimizer = make_optimizer(list(named.values()), t, device=None if sharded else accelerator.device)
    lr_schedule = make_lr_schedule(optimizer, t)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    unwrapped = accelerator.unwrap_model(model)
    named = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}  # after device placement
    ema = None
    if t.ema_decay:
        from .ema import EMA

        ema = EMA(named, t.ema_decay, on_cpu=t.ema_on_cpu)
    sampler = BucketBatchSampler(dataset.buckets, t.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=unwrapped, optimizer=optimizer, scheduler=lr_schedule, ema=ema, rank=rank)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        if main:
            print(f"resumed from {resume_from} at step {start}")
    model = apply_compile(model, t.compile)
    loss_fn = LossFn(cfg, base, transformer, dataset.null, accelerator.device)
    batches = BatchPrefetcher(dataset, sampler, accelerator.device)  # reads ahead in a thread
    trained = {"epoch": sampler.epoch, "batches_consumed": sampler.batches_consumed}  # data position of the weights

    def checkpoint(step: int, loss: float) -> Path:
        save_rng(run_dir, step, rank)
        accelerator.wait_for_everyone()
        state = {"sampler": {**sampler.state_dict(), **trained}, "loss": loss}
        path = save_checkpoint(run_dir, step, model=unwrapped, optimizer=optimizer, scheduler=lr_schedule,
                               ema=ema, state=state, keep=t.keep_checkpoints, main=main)  # fmt: skip
        accelerator.wait_for_everyone()
        return path

    profiler = step_profiler(run_dir, rank)  # PIXART_TUNE_PROFILE=FIRST:COUNT traces a few steps; else a no-op
    # Ctrl-C reaches every process; each notes it, and all stop after the same step (see below).
    interrupted = []
    stop_vote = StopVote(accelerator) if world > 1 else None  # one process needs no vote (nor its pinned buffer)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals only reach it
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if in_main_thread else None
    _init_trackers(accelerator, cfg)
    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
    bar = tqdm(total=t.steps, initial=start, desc="training", disable=not (show_progress and main))
    model.train()
    started, samples, step_loss = time.perf_counter(), 0, float("nan")
    window_start, window_samples = started, 0  # throughput over the last logging interval
    # The GPU runs ahead of Python: the step loss stays on the device, and the host reads it (a sync)
    # only where it needs it: logging, validation, checkpoints, the end. `first_bad` remembers the
    # first step whose loss was not finite, so the error still names it.
    first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def read_loss(step: int) -> float:
        bad = int(first_bad)
        if bad:
            raise NonFiniteLoss(
                f"loss became non-finite at step {bad}; the run stopped at step {step}. The last good checkpoint is "
                f"kept under {run_dir / 'checkpoints'}; lower train.lr, set train.max_grad_norm, or use bf16/fp32"
            )
        return float(loss_t)

    try:
        for step in range(start, t.steps):
            loss_t = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum):
                batch, trained = next(batches)
                size = batch["mean"].shape[0]
                gens = sample_generators(cfg.seed, step, micro, rank * size, size, accelerator.device)
                with accelerator.accumulate(model):
                    loss = loss_fn(model, batch, gens).mean()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(list(named.values()), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_t = loss_t + accelerator.reduce(loss.detach(), "mean") / t.grad_accum
                samples += size * world
                window_samples += size * world
            done = step + 1
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss_t), done, first_bad)
            if ema is not None:
                ema.update()
            bar.update(1)
            if done % t.log_every == 0 or done == start + 1 or done == t.steps:
                step_loss, lr = read_loss(done), lr_schedule.get_last_lr()[0]
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                row = {"loss": step_loss, "lr": lr, "samples_per_s": rate}
                if torch.cuda.is_available():  # this process's peak so far (under FSDP: its shard's share)
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                accelerator.log(row, step=done)
                if metrics:
                    metrics.write(json.dumps({"step": done, **row, "time": time.time()}) + "\n")  # time: Unix seconds
                    metrics.flush()
                window_start, window_samples = now, 0
            if validator and cfg.validation.every and done % cfg.validation.every == 0 and done != t.steps:
                read_loss(done)
                validator(accelerator.unwrap_model(model), done, run_dir / "samples", save=main)
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
                checkpoint(done, read_loss(done))
            # One process: stop now. Several: stop where all agree (a step later, without a host sync).
            stop = stop_vote(bool(interrupted)) if stop_vote else bool(interrupted)
            if stop:
                raise TrainingInterrupted(checkpoint(done, read_loss(done)))
            profiler.step()
    finally:
        profiler.stop()
        batches.close()
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        if metrics:
            metrics.close()

    accelerator.wait_for_everyone()
    final = _save_final(unwrapped, transformer, run_dir, t.method, ema, main)
    if validator:
        validator(unwrapped, t.steps, run_dir / "samples", save=main)
    if main:
        elapsed = time.perf_counter() - started
        what = "LoRA adapter (PEFT)" if t.method == "lora" else "full transformer (diffusers)"
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
        print(f"trained {t.steps - start} steps in {elapsed:.0f} s ({samples / elapsed:.1f} samples/s{peak}); "
              f"last loss {step_loss:.4f}")  # fmt: skip
        print(f"wrote {what} to {final}; config {run_dir / 'config.yaml'}; metrics {run_dir / 'metrics.jsonl'}")
    # end_training takes the process group down: every process waits until all are done, so that none
    # tears its group down while another still works (tests/checkpoint_worker.py's teardown note).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
