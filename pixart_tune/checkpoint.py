"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    <run>/checkpoints/step-000100/
        trainable.safetensors   the trained parameters only (LoRA weights, or the full transformer), fp32
        optimizer.pt            optimizer state        scheduler.pt   lr schedule state
        ema.safetensors         EMA weights (if on)    rng-<rank>.pt  torch RNG states of each process
        state.json              step, data position (sampler state), loss
A checkpoint folder appears only once complete (written as .tmp, then renamed), so a crash or a
kill leaves the previous checkpoints intact; `latest_checkpoint` ignores half-written ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or does not match the run."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """`resume=latest` or a path -> the checkpoint folder, with a clear error when there is none."""
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"resume=latest: no complete checkpoint under {checkpoint_dir(run_dir)}")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume={resume}: not a complete checkpoint folder (no state.json)")
    return path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, ema, state: dict, keep: int) -> Path:
    """Main process: write checkpoint step-N atomically, then drop all but the newest `keep`."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if ema is not None:
        save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
    for rng in root.glob(f".rng-step-{step:06d}-*.pt"):  # RNG states the other ranks left beside it
        os.replace(rng, tmp / rng.name.replace(f".rng-step-{step:06d}-", "rng-"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_rng(run_dir: Path, step: int, rank: int) -> None:
    """Every process: its RNG states, collected into the checkpoint by the main process."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    tmp = root / f".rng-step-{step:06d}-{rank}.pt.tmp"
    torch.save(states, tmp)
    os.replace(tmp, root / f".rng-step-{step:06d}-{rank}.pt")


def load_checkpoint(path: Path, *, model, optimizer, scheduler, ema, rank: int) -> dict:
    """Restore a checkpoint into live objects; returns its state.json."""
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    mismatch = sorted(set(saved) ^ {n for n, p in params.items() if p.requires_grad})
    if mismatch:
        raise CheckpointError(
            f"{path} was saved for other trainable parameters (e.g. {mismatch[0]}); resume with the recipe that wrote it"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path} has no EMA weights but train.ema_decay is set")
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    rng = path / f"rng-{rank}.pt"
    if rng.is_file():
        states = torch.load(rng, weights_only=True)
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    return state
