"""Checkpoints hold full tensors keyed by name and restore training exactly: for every optimiser,
and with the weights sharded by FSDP2 across 2 processes (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_worker import run_sequence
from conftest import assert_same_tensors
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def _run(out: Path, optimizer: str = "adamw", cross: Path | None = None, fsdp: bool = False, *extra: str) -> None:
    """The worker's sequence: in this process, or sharded by FSDP2 over 2 gloo processes."""
    out.mkdir(parents=True, exist_ok=True)
    if not fsdp:
        run_sequence(out, optimizer, cross=cross)
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [str(WORKER), str(out), "--fsdp", "--optimizer", optimizer, *(["--cross", str(cross)] if cross else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group, so that a hung collective is killed with its workers, not left behind.
    proc = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    progress = "\n".join(line for line in output.splitlines() if line.startswith("rank "))  # the worker's stages
    assert proc.returncode == 0, f"{progress}\n...\n{output[-3000:]}"


def _load(out: Path, name: str) -> dict[str, torch.Tensor]:
    return {**load_file(str(out / f"{name}-weights.safetensors")),
            **{f"ema.{k}": v for k, v in load_file(str(out / f"{name}-ema.safetensors")).items()}}  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor", "came", "prodigy"])
def test_resume_continues_exactly_for_every_optimizer(optimizer, tmp_path):
    _run(tmp_path, optimizer)
    assert_same_tensors(_load(tmp_path, "resumed"), _load(tmp_path, "straight"), atol=0)
    ckpt = tmp_path / "checkpoints" / "step-000003"
    assert set(load_file(str(ckpt / "trainable.safetensors"))) == {"2.weight", "2.bias", "3.weight", "3.bias"}


@pytest.mark.timeout(300)
def test_fsdp_sharded_checkpoint_is_the_full_one_and_resumes_exactly(tmp_path):
    plain, sharded, single = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "single"
    step3 = "checkpoints/step-000003"
    _run(plain)
    _run(sharded, cross=plain / step3, fsdp=True)
    _run(single, cross=sharded / step3)
    # What FSDP writes is the whole tensor set, the same as a single process writes...
    for name in ("trainable.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(str(sharded / step3 / name)), load_file(str(plain / step3 / name)), atol=1e-6)
    assert sorted(p.name for p in (sharded / step3).glob("*")) == sorted(p.name for p in (plain / step3).glob("*"))
    # ...and resuming a sharded run from it continues as if uninterrupted.
    assert_same_tensors(_load(sharded, "resumed"), _load(sharded, "straight"), atol=1e-6)
    assert_same_tensors(_load(sharded, "straight"), _load(plain, "straight"), atol=1e-5)
    # A run may resume on another number of GPUs: unsharded -> FSDP and FSDP -> one process.
    assert_same_tensors(_load(sharded, "cross"), _load(plain, "straight"), atol=1e-5)
    assert_same_tensors(_load(single, "cross"), _load(sharded, "straight"), atol=1e-5)


@pytest.mark.timeout(300)
def test_fsdp_kept_gathered_checkpoints_after_a_validation(tmp_path):
    """FSDP2 keeping each forward's gathered weights to its backward (the fsdp2.yaml recipe's setting), a
    validation's forwards (no backward) before the step-3 checkpoint: with validation.return_to_shards
    the checkpoint is written (without it, it hangs) and is the single process's, and the run and its
    resumption end as the single process's run does."""
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    step3 = "checkpoints/step-000003"
    _run(plain)
    _run(sharded, "adamw", None, True, "--kept-gathered")
    assert_same_tensors(load_file(str(sharded / step3 / "trainable.safetensors")),
                        load_file(str(plain / step3 / "trainable.safetensors")), atol=1e-6)  # fmt: skip
    assert_same_tensors(_load(sharded, "straight"), _load(plain, "straight"), atol=1e-5)
    assert_same_tensors(_load(sharded, "resumed"), _load(sharded, "straight"), atol=1e-6)


def test_return_to_shards_leaves_an_unsharded_model_alone():
    from pixart_tune.validation import return_to_shards

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return_to_shards(model)
    assert_same_tensors(model.state_dict(), before, atol=0)


def test_a_checkpoint_of_other_parameters_is_refused(tmp_path):
    from pixart_tune.checkpoint import CheckpointError, load_checkpoint

    _run(tmp_path)
    other = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        load_checkpoint(
            tmp_path / "checkpoints" / "step-000003", model=other, optimizer=opt, scheduler=None, ema=None, rank=0
        )


def test_fsdp_refuses_what_is_not_checked():
    from types import SimpleNamespace

    from pixart_tune.config import Config
    from pixart_tune.trainer import _check_distributed

    def accelerator(kind, fsdp2=True):
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), is_fsdp2=fsdp2)

    full = Config.model_validate({"train": {"method": "full", "optimizer": "adamw"}})
    assert _check_distributed(accelerator("MULTI_GPU"), full) is False
    assert _check_distributed(accelerator("FSDP"), full) is True
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        _check_distributed(accelerator("FSDP", fsdp2=False), full)
    with pytest.raises(NotImplementedError, match="--multi_gpu"):
        _check_distributed(accelerator("FSDP"), Config.model_validate({"train": {"method": "lora"}}))
    with pytest.raises(NotImplementedError, match="train.optimizer=adamw8bit"):
        _check_distributed(accelerator("FSDP"), Config.model_validate({"train": {"method": "full", "optimizer": "adamw8bit"}}))
