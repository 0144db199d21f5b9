"""Check the full fine-tune under FSDP2 on two GPUs, on the embedded tiny PixArt (needs 2 CUDA GPUs).

    python scripts/fsdp_check.py [--work DIR]

Runs, in fp32 so that differences mean something:
  single   1 GPU, batch 2, 8 steps                                  (the reference)
  fsdp     2 GPUs under recipes/accelerate/fsdp2.yaml, batch 1 each (same global batch), with EMA,
           a checkpoint at step 4 and validation images
  resumed  2 GPUs FSDP, resumed from fsdp's step-4 checkpoint
and compares the final weights; prints a JSON report and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench import NO_NVLINK_MULTICAST  # scripts/ is on sys.path when run as a script
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-lora.yaml"
FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp2.yaml"
COMMON = ["train.method=full", "train.lr=2e-4", "train.steps=8", "train.checkpoint_every=4", "train.ema_decay=0.9",
          "train.mixed_precision=no", "model.weight_dtype=fp32", "train.log_every=1", "train.log_with=none",
          "train.optimizer=adamw", "validation.prompts=[a photo of a cat]", "validation.seeds=[1]",
          "validation.every=4", "validation.steps=2", "validation.height=64", "validation.width=64"]  # fmt: skip
ENV = {**os.environ, **NO_NVLINK_MULTICAST}


def launch(run: Path, cache: Path, gpus: int, *extra: str) -> None:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if gpus > 1:
        launcher += ["--config_file", str(FSDP_CONFIG), "--num_processes", str(gpus)]
    else:
        launcher += ["--num_processes", "1", "--mixed_precision", "no"]
    cmd = [*launcher, "-m", "pixart_tune", "train", str(RECIPE), f"output_dir={run}", f"data.cache_dir={cache}",
           *COMMON, *extra]  # fmt: skip
    subprocess.run(cmd, check=True, env=ENV, cwd=REPO)


def max_diff(a: Path, b: Path) -> tuple[float, float]:
    """Largest absolute and relative (to the tensor's largest value) difference of two weight files."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys(), (a, b)
    abs_d = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    rel_d = max(float((wa[k].float() - wb[k].float()).abs().max() / wb[k].float().abs().max().clamp_min(1e-12)) for k in wa)
    return abs_d, rel_d


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("scripts/fsdp_check.py needs 2 CUDA GPUs")
    work = args.work or Path(tempfile.mkdtemp(prefix="pixart-fsdp-"))
    cache = work / "cache"
    runs = {name: work / name for name in ("single", "fsdp", "resumed")}
    launch(runs["single"], cache, 1, "train.batch_size=2")
    launch(runs["fsdp"], cache, 2, "train.batch_size=1")
    shutil.copytree(runs["fsdp"] / "checkpoints" / "step-000004", runs["resumed"] / "checkpoints" / "step-000004")
    launch(runs["resumed"], cache, 2, "train.batch_size=1", "resume=latest")

    from diffusers import PixArtTransformer2DModel

    weights = "diffusion_pytorch_model.safetensors"
    report, ok = {}, True
    checks = {  # (a, b, relative tolerance)
        "fsdp_vs_single_final_raw": (runs["fsdp"] / "final-raw", runs["single"] / "final-raw", 1e-3),
        "fsdp_vs_single_final_ema": (runs["fsdp"] / "final", runs["single"] / "final", 1e-3),
        "resumed_vs_uninterrupted": (runs["resumed"] / "final", runs["fsdp"] / "final", 1e-4),
    }
    for name, (a, b, tol) in checks.items():
        abs_d, rel_d = max_diff(a / weights, b / weights)
        report[name] = {"max_abs": abs_d, "max_rel": rel_d, "tolerance_rel": tol, "ok": rel_d <= tol}
        ok &= rel_d <= tol
    model = PixArtTransformer2DModel.from_pretrained(runs["fsdp"] / "final")  # diffusers reads what FSDP wrote
    report["final_loads_with_diffusers"] = sum(p.numel() for p in model.parameters())
    losses = [json.loads(x)["loss"] for x in (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()]
    report["fsdp_losses"] = losses
    report["validation_grids"] = sorted(p.name for p in (runs["fsdp"] / "samples").glob("*.png"))
    ok &= report["validation_grids"] == ["step-000004.png", "step-000008.png"]
    report["checkpoint_files"] = sorted(p.name for p in (runs["fsdp"] / "checkpoints" / "step-000004").iterdir())
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
