"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    <run>/checkpoints/step-000100/
        trainable.safetensors   the trained parameters only (LoRA weights, or the full transformer), fp32
        optimizer.pt            optimizer state        scheduler.pt   lr schedule state
        ema.safetensors         EMA weights (if on)    rng-<rank>.pt  torch RNG states of each process
        state.json              step, data position (sampler state), loss
A checkpoint folder appears only once complete (written as .tmp, then renamed), so a crash or a
kill leaves the previous checkpoints intact; `latest_checkpoint` ignores half-written ones.

The files hold full (unsharded) tensors keyed by parameter name, whatever the number of processes
and whether FSDP shards the weights: under FSDP every process takes part in gathering them (so every
process calls save_checkpoint) and the main process writes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from .atomic import atomic_dir

# Gather full tensors onto the main process's CPU (a no-op gather without FSDP); other ranks get {}.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)

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


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def full_state(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights (only the trained ones by default), whole, on the main process's CPU.

    Collective under FSDP: every process must call it; processes other than the main one get {}."""
    # Frozen weights are left on the GPU (a LoRA run would otherwise copy its 1.2 GB base to the CPU
    # on every save); buffers (e.g. the positional embedding) still come and are dropped below.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if trainable_only:
        names = _trainable_names(model)
        state = {n: v for n, v in state.items() if n in names}
    return {n: (v.float() if trainable_only else v).contiguous() for n, v in state.items()}


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards the model's weights (DTensor parameters)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _optimizer_state(model, optimizer) -> dict:
    """The optimizer's state with full tensors. Under FSDP (AdamW only, see trainer) torch gathers it
    and keys it by parameter name; otherwise it is optimizer.state_dict(), which every optimiser
    round-trips (torch's gatherer does not know Prodigy's extra param-group entries)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=_GATHER)
    return optimizer.state_dict()


def _load_optimizer_state(model, optimizer, state: dict) -> None:
    """Restore either form of optimizer.pt into a sharded or unsharded run (the number of GPUs may change)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    by_name = all(isinstance(i, str) for g in state["param_groups"] for i in g["params"])
    if not by_name and not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    if not by_name:  # written by an unsharded run: positions follow the trainable parameters' order
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        state = {"state": {names[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}  # fmt: skip
    # Every process passes the full state; under FSDP each keeps its shard.
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, ema, state: dict, keep: int,
                    main: bool = True) -> Path:  # fmt: skip
    """Write checkpoint step-N atomically, then drop all but the newest `keep`.

    Every process calls it; only `main` writes. Under FSDP the others take part in gathering the
    shards; without it they have nothing to do."""
    final = checkpoint_dir(run_dir) / f"step-{step:06d}"
    if not main and not is_sharded(model):
        return final
    weights = full_state(model)
    optim = _optimizer_state(model, optimizer)
    shadow = ema.state_dict() if ema is not None else None
    if not main:
        return final
    with atomic_dir(final, tmp=final.with_name(f".{final.name}.tmp")) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if shadow is not None:
            save_file(shadow, str(tmp / "ema.safetensors"))
        for rng in final.parent.glob(f".rng-step-{step:06d}-*.pt"):  # RNG states the other ranks left beside it
            os.replace(rng, tmp / rng.name.replace(f".rng-step-{step:06d}-", "rng-"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
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
    mismatch = sorted(set(saved) ^ _trainable_names(model))
    if mismatch:
        raise CheckpointError(
            f"{path} was saved for other trainable parameters (e.g. {mismatch[0]}); resume with the recipe that wrote it"
        )
    # Every process reads the full tensors; under FSDP each keeps its own shard.
    set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
    _load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
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
