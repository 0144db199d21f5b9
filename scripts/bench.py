"""pixart_tune benchmark: training throughput, MFU, peak memory, cache and inference speed.

Builds the real PixArt-XL-2 architecture (1024-MS and 512 variants), the SD VAE and T5-XXL at
random init (no weights can be fetched; throughput depends on shapes, dtypes and kernels, not on
weight values), writes them in the Hub layout, and measures in ONE run:
  ours      `pixart_tune.train()` on cached features: the exact path the recipes run
  baseline  (a) the reference recipe: diffusers + peft eager, LoRA on the official script's target
                list, T5-XXL and the VAE run every step
            (b) the same plain diffusers + peft loop on cached features
            (c) a plain full fine-tune loop (fp32 masters, bf16 autocast, fused AdamW, eager)
  cache     raw VAE + T5 throughput vs `build_cache` on the same images
  inference 1024 px, 20 steps with a LoRA: `load_pipeline` vs diffusers + PeftModel
and prints one table with ratios, the card and the software versions.

    python scripts/bench.py                      # on a GPU: everything (~10 min on an H100)
    python scripts/bench.py --smoke              # CPU, tiny kit, seconds: checks the script runs
    python scripts/bench.py --only headline --work W   # the README's main rows; then --only baselines --work W
    python scripts/bench.py --only main_rows --work W  # LoRA and full fine-tune once each (A/B across versions)
    python scripts/bench.py --multi-gpu          # 1 vs 2 processes through accelerate launch
    python scripts/bench.py --multi-gpu --only fsdp --trace 8:4   # and where each process's step goes
    python scripts/bench.py --only lora --trace 8:4 --set train.attention=fa4  # one GPU's step, the same way
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_clock import ClockSampler, nvidia_smi_id  # noqa: E402 - scripts/ is on sys.path when run as a script

from pixart_tune.step_profile import ENV as PROFILE_ENV  # noqa: E402 - the switch --trace sets (after the path)
from pixart_tune.step_profile import parse_spec  # noqa: E402

# Required FLOPs per image (shared/PERF.md): full step = 3x forward; LoRA = linear 2x, attention 3x.
STEP_TFLOP = {("lora", 1024): 15.3, ("full", 1024): 19.5, ("lora", 512): 2.6, ("full", 512): 3.71}
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # measured bf16 dense matmul (shared/PERF.md, KINDS.md)
# Multi-GPU launches: NVLink multicast (NVLS) stays off on the lent machines (their KINDS.md says why).
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
OFFICIAL_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "proj", "linear", "linear_1", "linear_2"]  # fmt: skip


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# ---------------------------------------------------------------------------------------------
# The models: real architecture, random init, written in the Hub layout


def write_random_base(folder: Path, sample_size: int, text_encoder_from: Path | None = None) -> Path:
    """PixArt-XL-2 (sample_size 128 = 1024-MS, 64 = 512) + SD VAE + T5-XXL, random init, bf16."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from pixart_tune.tiny import PIXART_SCHEDULER, embedded_tiny_path

    if (folder / "model_index.json").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        transformer = PixArtTransformer2DModel(sample_size=sample_size, caption_channels=4096).to(torch.bfloat16)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            scaling_factor=0.18215, force_upcast=True,
        )  # fmt: skip
        if text_encoder_from is None:
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", dropout_rate=0.1))  # fmt: skip
            t5 = t5.to(torch.bfloat16).eval()
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = AutoTokenizer.from_pretrained(embedded_tiny_path(), subfolder="tokenizer")  # ids < 32128
    if text_encoder_from is not None:  # share T5-XXL and the VAE's weights on disk between variants
        folder.mkdir(parents=True)
        transformer.save_pretrained(folder / "transformer")
        for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
            os.symlink(text_encoder_from / part, folder / part)
        return folder
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))  # fmt: skip
    pipe.save_pretrained(folder)
    del pipe, t5, vae, transformer
    free()
    return folder


def write_photos(folder: Path, n: int, size: int) -> Path:
    """n synthetic square photos with captions (one bucket, so every batch is full)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"a photo of a colourful pattern number {i}, soft light, detailed")
    return folder


FULL = ("train.method=full", "train.lr=1e-5")  # recipe overrides of every full fine-tune row


# ---------------------------------------------------------------------------------------------
# Ours: the trainer itself


def run_ours(base: Path, data: Path, cache: Path, work: Path, name: str, overrides: list[str], steps: int) -> dict:
    """Train through pixart_tune.train() and read the steady-state rate from metrics.jsonl."""
    from pixart_tune import train

    free()
    run = work / name
    shutil.rmtree(run, ignore_errors=True)  # a row run twice (sections sharing it) must not append to its metrics
    log_every = max(1, steps // 4)
    started = time.perf_counter()
    gpu = nvidia_smi_id(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    with ClockSampler(gpu) as clocks:  # the card's clock, power and temperature beside the rate (gpu_clock.py)
        train(REPO / "recipes" / "tiny-lora.yaml", [
            f"output_dir={run}", f"model.base={base}", f"data.path={data}", f"data.cache_dir={cache}",
            f"train.steps={steps}", f"train.log_every={log_every}", "train.log_with=none", "train.checkpoint_every=null",
            *overrides,
        ], show_progress=False)  # fmt: skip
    total = time.perf_counter() - started
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > log_every]  # first interval holds the warm-up
    losses = [r["loss"] for r in rows]
    result = {"samples_per_s": sum(r["samples_per_s"] for r in steady) / len(steady), "peak_gib": peak_gib(),
              "wall_s": total, "first_loss": losses[0], "last_loss": losses[-1], "final": str(run / "final")}  # fmt: skip
    window_start = max(r["time"] for r in rows if r["step"] <= log_every)  # the steady window: after that row
    result["gpu_state"] = clocks.summary(window_start, steady[-1]["time"])  # None without nvidia-smi
    # Each logged interval's rate beside its clock: a long row (--steps 400) shows whether the rate settles.
    starts = [window_start] + [r["time"] for r in steady[:-1]]
    result["intervals"] = [{"to_step": r["step"], "samples_per_s": r["samples_per_s"], "gpu_state": clocks.summary(t0, r["time"])}
                           for t0, r in zip(starts, steady)]  # fmt: skip
    traced, spec = run / "profile" / "rank0.json", os.environ.get(PROFILE_ENV)
    if spec and traced.is_file():  # --trace: the steps this run traced, summarised
        result["trace"] = summarise_trace_file(traced, spec)
    return result


# ---------------------------------------------------------------------------------------------
# Baselines: what a user gets by hand with diffusers + peft


def run_plain(base: Path, method: str, resolution: int, batch: int, steps: int, encoders: bool, targets=None) -> dict:
    """A plain eager loop: random batches already on the device (favouring the baseline)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model

    from pixart_tune.models import load_text_encoder

    free()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    transformer = PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=dtype).to(dev)
    if method == "lora":
        transformer.requires_grad_(False)
        model = get_peft_model(transformer, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    else:
        model = transformer.float().requires_grad_(True)  # fp32 masters, bf16 autocast
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev == "cuda")
    lat = resolution // 8
    if encoders:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype).to(dev)
        t5 = load_text_encoder(str(base), dtype).to(dev)
        pixels = torch.randn(batch, 3, resolution, resolution, device=dev, dtype=dtype)
        ids = torch.randint(3, 100, (batch, 120), device=dev)
    cond_on = transformer.config.sample_size == 128
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=dev), 0)

    def step():
        with torch.no_grad():
            if encoders:
                latents = vae.encode(pixels).latent_dist.sample() * 0.18215
                embeds = t5(ids, attention_mask=torch.ones_like(ids))[0]
                mask = torch.ones(batch, 120, device=dev)
            else:
                latents = torch.randn(batch, 4, lat, lat, device=dev)
                width = transformer.config.caption_channels
                embeds, mask = torch.randn(batch, 120, width, device=dev, dtype=dtype), torch.ones(batch, 120, device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        noise = torch.randn_like(latents, dtype=torch.float32)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise
        cond = {"resolution": torch.full((batch, 2), float(resolution), device=dev),
                "aspect_ratio": torch.ones(batch, 1, device=dev)} if cond_on else {"resolution": None, "aspect_ratio": None}  # fmt: skip
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = model(hidden_states=noisy.to(dtype), encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask,
                        timestep=t, added_cond_kwargs=cond).sample  # fmt: skip
        loss = torch.nn.functional.mse_loss(out.chunk(2, dim=1)[0].float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    rate = batch * steps / (time.perf_counter() - started)
    return {"samples_per_s": rate, "peak_gib": peak_gib()}  # the models go with this frame


# ---------------------------------------------------------------------------------------------


def inference(base: Path, adapter: str, steps: int, size: int) -> dict:
    """1024 px, `steps` steps, one LoRA: our load_pipeline (fused) vs diffusers + PeftModel."""
    from diffusers import PixArtAlphaPipeline
    from peft import PeftModel

    from pixart_tune import inference as ours

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    free()
    pipe = PixArtAlphaPipeline.from_pretrained(base, torch_dtype=dtype).to(dev)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, adapter)
    plain = ours.benchmark_latency(pipe, steps=steps, height=size, width=size)
    del pipe
    free()
    pipe = ours.load_pipeline(str(base), lora=adapter, device=dev, dtype=dtype, fuse=True)
    fused = ours.benchmark_latency(pipe, steps=steps, height=size, width=size)
    del pipe
    free()
    result = {"diffusers_peft_s": plain, "ours_fused_s": fused, "ours_s": fused, "speedup": plain / fused}
    if dev == "cuda":  # the fast path: fused adapter + compiled transformer blocks
        pipe = ours.load_pipeline(str(base), lora=adapter, device=dev, dtype=dtype, fuse=True, compile=True)
        result["ours_s"] = ours.benchmark_latency(pipe, steps=steps, height=size, width=size)
        result["speedup"] = plain / result["ours_s"]
        del pipe
        free()
    return result


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


# Each of these patches one thing for the rows run inside it and puts it back after (mock.patch).
def fa4_heads_padded():
    """train.attention=fa4 as it runs where its dq check fails: heads padded, no dq fix used."""
    from pixart_tune import fa4

    return mock.patch.object(fa4, "choose_head_padding", lambda head_dim: (fa4.HEAD_MULTIPLE, "padded (benchmark)"))


def triton_lora_off():
    """The fused LoRA linears on the cuBLAS pair only (what runs off Hopper or without Triton). A user's
    own PIXART_TUNE_TRITON_LORA is restored afterwards."""
    return mock.patch.dict(os.environ, {"PIXART_TUNE_TRITON_LORA": "0"})


def adamw_foreach():
    """AdamW as the trainer built it before it asked for the fused kernel: torch's foreach default."""
    from pixart_tune import optim, trainer

    # the params are still on the CPU when the trainer builds the optimizer
    return mock.patch.object(trainer, "make_optimizer", lambda params, t, device=None: optim.make_optimizer(params, t))


def run_sections(args, work: Path) -> dict:
    """Every measurement, in one process, one after the other (each frees the GPU after itself)."""
    from pixart_tune.bench_cache import measure_cache_throughput
    from pixart_tune.fa4 import fa4_installed
    from pixart_tune.tiny import embedded_tiny_path

    smoke = args.smoke
    want = set(args.only or ["cache", "lora", "fp8", "full", "fa4", "fa4_variants", "lora512", "full512", "memory",
                             "baselines", "inference"])  # fmt: skip
    res, batch = (256, 2) if smoke else (1024, args.batch)
    steps = args.steps or (4 if smoke else 40)
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if smoke:
        base = base512 = embedded_tiny_path()
    else:
        base = write_random_base(work / "base-1024", 128)
        base512 = write_random_base(work / "base-512", 64, text_encoder_from=base)
    data = write_photos(work / f"photos-{res}", 4 * batch, res)
    data512 = write_photos(work / "photos-512", 4 * batch, 512 if not smoke else 256)
    fast = [] if smoke else ["train.compile=regional", "train.attention=cudnn"]
    common = [f"train.batch_size={batch}", "train.lr=1e-4", "lora.rank=16", "lora.alpha=16", "lora.targets=attention+ff",
              "model.weight_dtype=" + ("bf16" if dev == "cuda" else "fp32"), "data.t5_dtype=" + ("bf16" if dev == "cuda" else "fp32"),
              "train.mixed_precision=" + ("bf16" if dev == "cuda" else "no"), "data.num_workers=4"]  # fmt: skip
    out: dict = {"resolution": res, "batch": batch, "steps": steps, "device": dev}

    def section(name, fn, *a, **kw):
        """Run one measurement; a failure is recorded and the others still run."""
        try:
            out[name] = fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke and carries on
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            free()
        print(name, out.get(name, out.get("errors", {}).get(name)), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, default=str))

    def ours(name, b, d, r, extra):  # --set comes last: it overrides the row's own settings
        overrides = [*common, f"data.resolution={r}", *extra, *args.set]
        section(name, run_ours, b, d, work / f"cache-{r}", work, name, overrides, steps)

    def cache_stage(name="cache"):
        section(name, measure_cache_throughput, str(base), dev, n_images=8 if smoke else 96, resolution=res,
                batch_size=batch, workers=4 if smoke else 8, t5_dtype="bf16" if dev == "cuda" else "fp32")  # fmt: skip

    if "cache" in want:
        cache_stage()
    if "lora" in want:
        ours("lora", base, data, res, fast)
    if "fp8" in want and (smoke or torch.cuda.get_device_capability() >= (9, 0)):
        ours("lora_fp8", base, data, res, [*fast, "train.fp8=true"])  # frozen base linears in FP8
    if "full" in want:
        ours("full", base, data, res, [*fast, *FULL])
    fa4_missing = not fa4_installed()
    if want & {"fa4", "fa4_variants"} and not smoke and fa4_missing:
        out["skipped"] = {"fa4": "flash-attn-4 is not installed (pip install -e '.[fa4]')"}
        print("fa4 sections skipped:", out["skipped"]["fa4"])
    fa4 = [*fast, "train.attention=fa4"]
    if "fa4" in want and not smoke and not fa4_missing:  # FlashAttention-4 self-attention (Hopper+)
        ours("lora_fa4", base, data, res, fa4)
        ours("lora_fa4_peft", base, data, res, [*fa4, "train.fused_lora=false"])  # peft's own LoRA forward
        with triton_lora_off():  # the adapter summed by two cuBLAS GEMMs, not lowrank_triton's one kernel
            ours("lora_fa4_cublas_pair", base, data, res, fa4)
        ours("full_fa4", base, data, res, [*fa4, *FULL])
    if "headline" in want and not smoke and not fa4_missing:  # the README's main rows; full fine-tunes A B A
        ours("lora_fa4", base, data, res, fa4)
        ours("lora_fa4_fp8", base, data, res, [*fa4, "train.fp8=true"])
        ours("full_fa4", base, data, res, [*fa4, *FULL])
        ours("full_fa4_cublas", base, data, res, [*fa4, *FULL, "train.quack_gemms=false"])
        ours("full_fa4_2", base, data, res, [*fa4, *FULL])
    if "cache_effect" in want:  # a LoRA row before and after the cache stage in one process, then after a minute idle
        # The LoRA row that followed the cache stage ran 8% slower on two H100s, unexplained
        # (scripts/results/2026-11-27-h100-lora-after-cache-stage.json), and within 1% on a third
        # (2026-11-27-h100-s-cache-effect.json); each row's gpu_state shows the clock.
        extra = fast if smoke or fa4_missing else fa4
        ours("lora_before_cache", base, data, res, extra)
        cache_stage("cache_between")
        ours("lora_after_cache", base, data, res, extra)
        time.sleep(0 if smoke else 60)
        ours("lora_after_idle", base, data, res, extra)
    if "main_rows" in want and not smoke and not fa4_missing:  # the two main rows once: A/B across versions, by process
        ours("lora_fa4", base, data, res, fa4)
        ours("full_fa4", base, data, res, [*fa4, *FULL])
    if "quack" in want and not smoke and not fa4_missing:  # train.quack_gemms off and on, ABAB, LoRA then full
        for name in ("lora_fa4_cublas", "lora_fa4", "lora_fa4_cublas_2", "lora_fa4_2"):
            ours(name, base, data, res, [*fa4, *(["train.quack_gemms=false"] if "cublas" in name else [])])
        for name in ("full_fa4_cublas", "full_fa4", "full_fa4_cublas_2", "full_fa4_2"):
            ours(name, base, data, res, [*fa4, *FULL, *(["train.quack_gemms=false"] if "cublas" in name else [])])
    if "adamw" in want and not smoke and not fa4_missing:  # fused against foreach AdamW, full fine-tune, ABBA
        full = [*fa4, *FULL]
        ours("full_fa4_warmup", base, data, res, full)  # a process's first full fine-tune runs slower: not counted
        for name in ("fused", "foreach", "foreach_2", "fused_2"):
            with adamw_foreach() if name.startswith("foreach") else contextlib.nullcontext():
                ours(f"full_fa4_adamw_{name}", base, data, res, full)
    if want & {"fold", "fold_full"} and not smoke and not fa4_missing:  # the folded cross-attention, off and on
        off = "train.fold_cross_attention=false"
        if "fold" in want:
            ours("lora_fa4_unfolded", base, data, res, [*fa4, off])
            ours("lora_fa4_folded", base, data, res, fa4)
            ours("lora_fa4_fp8_folded", base, data, res, [*fa4, "train.fp8=true"])
            ours("lora_fa4_fp8_unfolded", base, data, res, [*fa4, "train.fp8=true", off])
        if "fold_full" in want:
            ours("full_fa4_unfolded", base, data, res, [*fa4, *FULL, off])
            ours("full_fa4_folded", base, data, res, [*fa4, *FULL])
    if "fa4_variants" in want and not smoke and not fa4_missing:
        with fa4_heads_padded():  # what runs where flash-attn-4's dq check fails: heads zero-padded to 96
            ours("lora_fa4_padded", base, data, res, fa4)
        ours("lora_fa4_fp8", base, data, res, [*fa4, "train.fp8=true"])
    if "lora512" in want:
        ours("lora512", base512, data512, 512 if not smoke else 256, [*fast])
    if "full512" in want:
        ours("full512", base512, data512, 512 if not smoke else 256, [*fast, *FULL])
    if "memory" in want:
        ours("lora_bs1_ckpt", base, data, res, [*fast, "train.batch_size=1", "train.gradient_checkpointing=true"])
        ours("full_recipe_24g", base, data, res, [*fast, *FULL, "train.batch_size=2",
                                                 "train.gradient_checkpointing=true", "train.optimizer=adamw8bit"])  # fmt: skip
    if "baselines" in want:
        n = max(2, steps // 4)
        section("ref_recipe", run_plain, base, "lora", res, batch, n, encoders=True, targets=OFFICIAL_LORA_TARGETS)
        section("plain_cached_lora", run_plain, base, "lora", res, batch, n, encoders=False, targets=OFFICIAL_LORA_TARGETS)
        section("plain_full", run_plain, base, "full", res, batch, n, encoders=False)
    if "inference" in want and "lora" in out:
        section("inference", inference, base, out["lora"]["final"], steps=2 if smoke else 20, size=res)
    return out


def print_table(r: dict) -> None:
    """One table: figures, ratios against the baselines measured in the same run, MFU."""
    v = r["versions"]
    peak = next((t for k, t in PEAK_TFLOPS.items() if k in v["card"]), None)
    print(f"\n{v['card']} | torch {v['torch']} (CUDA {v['cuda']}) | diffusers {v['diffusers']} | peft {v['peft']} | "
          f"transformers {v['transformers']} | accelerate {v['accelerate']} | {v['date']}")  # fmt: skip
    print(f"{r['resolution']} px, batch {r['batch']}, {r['steps']} steps per measurement\n")
    print(f"{'measurement':<34}{'samples/s':>10}{'MFU':>7}{'peak GiB':>10}{'SM MHz':>8}  vs baseline")
    for name, error in r.get("errors", {}).items():
        print(f"FAILED {name}: {error}")
    ref, cached, full = (r.get(k, {}).get("samples_per_s") for k in ("ref_recipe", "plain_cached_lora", "plain_full"))
    rows = [("ours: LoRA r16 attn+ff", "lora", "lora", r["resolution"]),
            ("ours: LoRA r16 attn+ff, train.fp8", "lora_fp8", "lora", r["resolution"]),
            ("ours: full fine-tune", "full", "full", r["resolution"]),
            ("ours: LoRA, train.attention=fa4", "lora_fa4", "lora", r["resolution"]),
            ("ours: LoRA, fa4, peft's LoRA forward", "lora_fa4_peft", "lora", r["resolution"]),
            ("ours: LoRA, fa4, no Triton LoRA GEMM", "lora_fa4_cublas_pair", "lora", r["resolution"]),
            ("ours: LoRA, fa4, heads padded to 96", "lora_fa4_padded", "lora", r["resolution"]),
            ("ours: LoRA, fa4 + fp8", "lora_fa4_fp8", "lora", r["resolution"]),
            ("ours: full fine-tune, fa4", "full_fa4", "full", r["resolution"]),
            ("ours: full, fa4, fp32 residual stream", "full_fa4_fp32_stream", "full", r["resolution"]),
            ("ours: full fine-tune, fa4, again", "full_fa4_2", "full", r["resolution"]),
            ("ours: LoRA, fa4, again", "lora_fa4_2", "lora", r["resolution"]),
            ("ours: LoRA, fa4, no quack GEMMs", "lora_fa4_cublas", "lora", r["resolution"]),
            ("ours: LoRA, fa4, no quack GEMMs, again", "lora_fa4_cublas_2", "lora", r["resolution"]),
            ("ours: LoRA, before the cache stage", "lora_before_cache", "lora", r["resolution"]),
            ("ours: LoRA, right after it", "lora_after_cache", "lora", r["resolution"]),
            ("ours: LoRA, after a minute idle", "lora_after_idle", "lora", r["resolution"]),
            ("ours: full, fa4, no quack GEMMs", "full_fa4_cublas", "full", r["resolution"]),
            ("ours: full, fa4, no quack GEMMs, again", "full_fa4_cublas_2", "full", r["resolution"]),
            ("ours: LoRA r16, 512 px", "lora512", "lora", 512), ("ours: full fine-tune, 512 px", "full512", "full", 512),
            ("ours: LoRA, batch 1, grad ckpt", "lora_bs1_ckpt", "lora", r["resolution"]),
            ("ours: full, recipe (ckpt, 8-bit AdamW)", "full_recipe_24g", "full", r["resolution"]),
            ("(a) reference recipe (T5+VAE per step)", "ref_recipe", "lora", r["resolution"]),
            ("(b) plain diffusers+peft, cached", "plain_cached_lora", "lora", r["resolution"]),
            ("(c) plain full fine-tune, eager", "plain_full", "full", r["resolution"])]  # fmt: skip
    for label, key, method, res in rows:
        if key not in r:
            continue
        m = r[key]
        tflop = STEP_TFLOP.get((method, res))
        mfu = f"{m['samples_per_s'] * tflop / peak:.0%}" if peak and tflop else "-"
        vs = ""
        if method == "lora" and key.startswith("lora") and ref and cached:
            vs = f"{m['samples_per_s'] / ref:.2f}x (a), {m['samples_per_s'] / cached:.2f}x (b)"
        elif method == "full" and key.startswith("full") and full:
            vs = f"{m['samples_per_s'] / full:.2f}x (c)"
        state = m.get("gpu_state")
        clock = f"{state['sm_mhz_median']:.0f}" if state else "-"
        print(f"{label:<34}{m['samples_per_s']:>10.2f}{mfu:>7}{m['peak_gib']:>10.1f}{clock:>8}  {vs}")
    if "cache" in r:
        c = r["cache"]
        print(f"\ncache stage: {c['cache_images_per_s']:.1f} img/s vs raw encoders {c['raw_images_per_s']:.1f} img/s "
              f"= {c['ratio']:.0%} (end to end incl. model loads {c['ratio_end_to_end']:.0%})")  # fmt: skip
    if "inference" in r:
        i = r["inference"]
        print(f"inference with a LoRA: ours {i['ours_s']:.3f} s (fused only: {i['ours_fused_s']:.3f} s) vs "
              f"diffusers+PeftModel {i['diffusers_peft_s']:.3f} s = {i['speedup']:.2f}x")  # fmt: skip


def multi_gpu(args, work: Path) -> dict:
    """The LoRA and full recipes through `accelerate launch` on 1 and on 2 GPUs of this machine (DDP),
    and the full fine-tune sharded by FSDP2 (recipes/accelerate/fsdp2.yaml) on 2."""
    base = write_random_base(work / "base-1024", 128)
    data = write_photos(work / "photos-1024", 4 * args.batch, 1024)
    steps = args.steps or 40
    out = {}
    env = {**os.environ, **NO_NVLINK_MULTICAST}
    if args.trace:  # every process traces a few steps (pixart_tune/step_profile.py), summarised below
        env[PROFILE_ENV] = args.trace
    variants = [("lora", 1, ""), ("lora", 2, ""), ("full", 1, ""), ("full", 2, ""), ("full", 2, "fsdp")]
    if args.only:  # --only lora / full (DDP) / fsdp; FSDP2 is compared with the 1-GPU full fine-tune
        chosen = [v for v in variants if (v[2] or v[0]) in args.only]
        variants = ([("full", 1, "")] if "fsdp" in args.only and "full" not in args.only else []) + chosen
    for method, n, sharding in variants:
        name = f"{method}-{sharding + '-' if sharding else ''}{n}gpu"
        run = work / f"mgpu-{name}"
        shutil.rmtree(run, ignore_errors=True)  # a rerun with the same --work must not append to its metrics
        if sharding == "fsdp":
            launcher = ["--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(n)]
        else:
            launcher = ["--num_processes", str(n), "--mixed_precision", "bf16", *(["--multi_gpu"] if n > 1 else [])]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
               *launcher, "-m", "pixart_tune", "train", str(REPO / "recipes" / "tiny-lora.yaml"), f"output_dir={run}",
               f"model.base={base}", f"data.path={data}", f"data.cache_dir={work / 'cache-1024'}",
               "data.resolution=1024", f"train.batch_size={args.batch}", f"train.steps={steps}",
               f"train.log_every={steps // 4}", "train.log_with=none", "train.compile=regional",
               "train.attention=cudnn", "model.weight_dtype=bf16", "data.t5_dtype=bf16", "train.mixed_precision=bf16",
               "lora.rank=16", "lora.alpha=16", f"train.method={method}", "train.lr=1e-5", "train.optimizer=adamw",
               *args.set]  # fmt: skip
        if subprocess.run(cmd, env=env).returncode != 0:  # report the others even if one variant fails
            out[name] = None
            continue
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        rates = [x["samples_per_s"] for x in rows if x["step"] > steps // 4]
        out[name] = sum(rates) / len(rates)
        out[f"{name}-peak_gib"] = rows[-1].get("peak_gib")  # the main process's GPU
        out[f"{name}-losses"] = [round(x["loss"], 4) for x in rows]
        print(f"multi-gpu {name}: {out[name]:.2f} samples/s, peak {out[f'{name}-peak_gib']} GiB", flush=True)
        if args.trace:
            out[f"{name}-trace"] = {path.stem: summarise_trace_file(path, args.trace)
                                    for path in sorted((run / "profile").glob("rank*.json"))}  # fmt: skip
            print(f"multi-gpu {name} trace: {json.dumps(out[f'{name}-trace'])}", flush=True)
    for two, one in (("lora-2gpu", "lora-1gpu"), ("full-2gpu", "full-1gpu"), ("full-fsdp-2gpu", "full-1gpu")):
        if out.get(two) and out.get(one):
            out[f"{two}-scaling"] = out[two] / out[one]
    print(json.dumps(out, indent=2))
    return out


KERNEL_GROUPS = [  # substrings of CUDA kernel names -> what they are; the first group that matches
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    # Inductor's kernels (triton_poi_..., triton_red_...) before the matmuls: they are named after the
    # ops they fuse, and those that feed our GEMM operators carry "gemm" in their names
    ("fused elementwise (triton)", ("triton_",)),
    ("fp8 matmul", ("e4m3", "f8f8", "fp8")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("elementwise / reduction (eager)", ("elementwise", "reduce", "vectorized", "unrolled", "copy", "fill")),
]


# --profile runs these (`--only lora fa4 ...` picks some): recipe overrides on top of the LoRA recipe's.
PROFILES = {
    "profile_lora": (),
    "profile_fp8": ("train.fp8=true",),
    "profile_fa4": ("train.attention=fa4",),
    "profile_full_fa4": ("train.attention=fa4", *FULL),
}


def kernel_group(kernel_name: str) -> str:
    """The KERNEL_GROUPS group of a CUDA kernel's name, or "other"."""
    name = kernel_name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")


def profile_runs_here(extra: tuple[str, ...]) -> bool:
    """fp8 needs sm90+; fa4 needs flash-attn-4 installed."""
    from pixart_tune.fa4 import fa4_installed

    if "train.fp8=true" in extra and torch.cuda.get_device_capability() < (9, 0):
        return False
    return "train.attention=fa4" not in extra or fa4_installed()


def profile_step(args, work: Path, extra: tuple[str, ...] = ()) -> dict:
    """Where the GPU time of our training step goes: a torch.profiler trace of a short trainer run,
    CUDA kernel time grouped by kind. Compile warm-up adds little GPU time, so the steady steps dominate;
    the run's model load (and, for a full fine-tune, its final save) are in the trace too.
    `extra`: recipe overrides on top of the LoRA recipe's (PROFILES)."""
    from torch.profiler import ProfilerActivity, profile

    base = write_random_base(work / "base-1024", 128)
    data = write_photos(work / "photos-1024", 4 * args.batch, 1024)
    overrides = [f"train.batch_size={args.batch}", "lora.rank=16", "lora.alpha=16", "model.weight_dtype=bf16",
                 "data.t5_dtype=bf16", "train.mixed_precision=bf16", "data.resolution=1024", "train.compile=regional",
                 "train.attention=cudnn", *extra, *args.set]  # fmt: skip
    name = "profile" + "".join(f"-{x.split('=')[0].split('.')[-1]}" for x in (*extra, *args.set))
    run_ours(base, data, work / "cache-1024", work, f"{name}-warm", overrides, 4)  # cache + compile outside the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_ours(base, data, work / "cache-1024", work, name, overrides, 12)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        group = kernel_group(event.key)
        totals[group] = totals.get(group, 0.0) + event.device_time_total / 1e3  # ms
    all_ms = sum(totals.values())
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:50]
    result = {"gpu_ms_per_step": all_ms / 12, "share": {g: t / all_ms for g, t in sorted(totals.items(), key=lambda x: -x[1])},
              "top_kernels_ms_per_step": {e.key[:120]: e.device_time_total / 1e3 / 12 for e in top}}  # fmt: skip
    trace = work / f"{name}-trace.json"
    prof.export_chrome_trace(str(trace))
    result["gpu_idle"] = gpu_idle(json.loads(trace.read_text())["traceEvents"], steps=12)
    print(json.dumps(result, indent=2))
    return result


SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def trace_summary(events: list[dict], steps: int) -> dict:
    """One process's traced training steps (step_profile.py's Chrome trace), per step in ms: the
    host's step (the ProfilerStep spans), the time the GPU is busy (the union of its kernels and
    copies, so overlapping streams count once), the NCCL kernels' share of that, the host's waits
    in CUDA syncs, and gpu_idle's gaps. A GPU busy for about the whole step is bound by its work (the
    collectives included); one that idles while the host is not waiting is waiting on the host."""
    host = [e["dur"] for e in events  # the host's spans (the GPU's copies are "gpu_user_annotation")
            if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep#")]  # fmt: skip
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)  # fmt: skip
    busy, end = 0.0, float("-inf")
    for start, stop in gpu:  # the union of the intervals
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    nccl = sum(e["dur"] for e in events if e.get("cat") == "kernel" and "nccl" in e.get("name", "").lower())
    syncs = sum(e["dur"] for e in events if e.get("name") in SYNCS and "dur" in e)
    per_step = steps * 1e3  # us -> ms a step
    return {"host_step_ms": sum(host) / max(len(host), 1) / 1e3, "gpu_busy_ms": busy / per_step,
            "nccl_kernels_ms": nccl / per_step, "host_sync_wait_ms": syncs / per_step,
            "gpu_idle": gpu_idle(events, steps)}  # fmt: skip


def summarise_trace_file(path: Path, spec: str) -> dict:
    """trace_summary of one process's trace (step_profile.py's rank<R>.json) over the COUNT steps that
    `spec` (FIRST:COUNT, as PIXART_TUNE_PROFILE) had it trace."""
    return trace_summary(json.loads(path.read_text())["traceEvents"], parse_spec(spec)[1])


def gpu_idle(events: list[dict], steps: int) -> dict:
    """Where the GPU waits between its kernels, from a profiler trace: the idle time per step in gaps
    by size, and the kernels that most often come right after a gap of 20 us or more (where the host
    was late). Only the training steps count: the window runs from the first matmul or attention
    kernel to the last (the model load before and the final save after are copies), and gaps of 50 ms
    and more (a checkpoint, a log line's sync) are left out."""
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)  # fmt: skip
    compute = [i for i, (_, _, name) in enumerate(spans) if kernel_group(name) in ("matmul", "fp8 matmul", "attention")]
    spans = spans[compute[0] : compute[-1] + 1] if compute else []
    sizes = {"<20us": 0.0, "20-100us": 0.0, "0.1-1ms": 0.0, "1-50ms": 0.0}
    after: dict[str, float] = {}
    end = spans[0][1] if spans else 0.0
    for start, stop, name in spans[1:]:
        gap = start - end  # us; concurrent kernels overlap and give none
        if 0 < gap < 50_000:
            bucket = "<20us" if gap < 20 else "20-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else "1-50ms"
            sizes[bucket] += gap / 1e3 / steps
            if gap >= 20:
                after[name[:80]] = after.get(name[:80], 0.0) + gap / 1e3 / steps
        end = max(end, stop)
    top = dict(sorted(after.items(), key=lambda x: -x[1])[:12])
    return {"idle_ms_per_step": sum(sizes.values()), "by_gap_size_ms_per_step": sizes, "after_gaps_ms_per_step": top}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny kit, seconds")
    p.add_argument("--multi-gpu", action="store_true", help="1 vs 2 GPUs through accelerate launch")
    p.add_argument("--profile", action="store_true", help="GPU time of the training step by kernel kind")
    p.add_argument("--only", nargs="*", default=None,
                   help="sections: cache lora fp8 full fa4 headline quack adamw fold fold_full fa4_variants lora512 full512 memory baselines inference cache_effect; "
                        "with --profile: lora fp8 fa4 full_fa4; with --multi-gpu: lora full fsdp")  # fmt: skip
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every training row (and --multi-gpu variant, --profile run), e.g. train.attention=fa4")
    p.add_argument("--trace", default=None, metavar="FIRST:COUNT",
                   help="trace COUNT steps after FIRST of every training row (with --multi-gpu: of every process; "
                        "PIXART_TUNE_PROFILE), summarised in its results")  # fmt: skip
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.trace:
        parse_spec(args.trace)  # a malformed value stops here, before any model is written
        if not args.multi_gpu:  # our rows train in this process: their trainer reads it at start
            os.environ[PROFILE_ENV] = args.trace
    work = Path(args.work or tempfile.mkdtemp(prefix="pixart-bench-"))
    if args.multi_gpu or args.profile:
        results = {}
        if args.profile:
            for name, extra in PROFILES.items():
                if (args.only is None or name.removeprefix("profile_") in args.only) and profile_runs_here(extra):
                    results[name] = profile_step(args, work, extra)
        if args.multi_gpu:
            results["multi_gpu"] = multi_gpu(args, work)
    else:
        results = run_sections(args, work)
        results["versions"] = versions()
        print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
