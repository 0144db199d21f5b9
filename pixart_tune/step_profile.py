"""A torch.profiler trace of a few training steps, per process: what a step waits on (PIXART_TUNE_PROFILE).

    PIXART_TUNE_PROFILE=FIRST:COUNT pixart-tune train ...     # e.g. 8:4

skips the run's first FIRST steps (compile warm-up, the first batches), warms the profiler up over one
more, then traces COUNT steps, host and CUDA activity, and writes `<output_dir>/profile/rank<R>.json`
(a Chrome trace) for each process R. Under `accelerate launch` every process writes its own, which is
how to see whether a multi-GPU step waits on its kernels, on the collectives or on the host
(`python scripts/bench.py --multi-gpu --trace FIRST:COUNT` summarises them). Tracing the host's ops
costs the host time of its own, so traced steps run a little slower than others; compare the GPU's
busy time with the step, not the traced rate with an untraced one. Unset, nothing is traced and the
training loop pays one no-op call a step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "PIXART_TUNE_PROFILE"


class _NoProfile:
    def step(self) -> None:
        pass

    def stop(self) -> None:
        pass


def parse_spec(spec: str) -> tuple[int, int]:
    """(first, count) from "FIRST:COUNT"; a clear error naming the variable otherwise."""
    try:
        first, count = (int(part) for part in spec.split(":"))
    except ValueError:
        first = count = -1
    if first < 0 or count < 1:
        raise ValueError(f"{ENV}={spec!r}: expected FIRST:COUNT with FIRST >= 0 and COUNT >= 1, e.g. 8:4 "
                         f"(skip 8 steps, warm up over one, trace 4)")  # fmt: skip
    return first, count


def step_profiler(run_dir: Path, rank: int):
    """A started torch.profiler.profile whose `step()` the training loop calls after each step, and
    whose `stop()` it calls at the end (it writes the trace when the traced steps are done); a no-op
    object where PIXART_TUNE_PROFILE is unset."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return _NoProfile()
    first, count = parse_spec(spec)
    out = Path(run_dir) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(skip_first=first, wait=0, warmup=1, active=count, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(str(out / f"rank{rank}.json")),
    )
    profiler.start()
    return profiler
