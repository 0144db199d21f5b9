"""The card's state while a benchmark row trains: SM clock, power, temperature, and what holds the clock back.

A rate means little without the clock it ran at. An H100 training PixArt draws about its power limit,
so its SM clock drops below the 1980 MHz boost under the software power cap, and by how much can
depend on how hot the card already is (scripts/results/2026-11-27-h100-lora-after-cache-stage.json:
1755-1785 MHz at 650-662 W during a LoRA row). `ClockSampler` runs `nvidia-smi` in a loop beside the
row. Each sample carries nvidia-smi's own timestamp (the machine's local time, turned into Unix
seconds here: lines can reach a pipe late, in buffered batches), and the trainer's metrics rows carry
Unix seconds too (`time`), so `summarise` can keep only the samples of the row's steady window.

Where nvidia-smi is missing (the CPU) or cannot report a field, there are no samples and the summary
is None: the benchmark goes on without it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
from datetime import datetime

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
STAMP = "%Y/%m/%d %H:%M:%S.%f"  # how nvidia-smi writes `timestamp`, in local time
# NVML's clock event reasons (nvidia-smi -q -d PERFORMANCE) that slow a busy card; idle (0x1) and the
# application clock setting (0x2) are left out.
REASONS = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "thermal (software)", 0x40: "thermal (hardware)",
           0x80: "power brake"}  # fmt: skip


def parse_sample(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`, e.g.
    '2026/11/27 11:39:57.519, 1785, 649.61, 63, 0x0000000000000004', as a sample stamped in Unix
    seconds; None for anything else (an error message, '[N/A]' for a field this card or driver does
    not report)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        return {"t": datetime.strptime(parts[0], STAMP).timestamp(), "sm_mhz": float(parts[1]),
                "power_w": float(parts[2]), "temp_c": float(parts[3]), "reasons": int(parts[4], 16)}  # fmt: skip
    except ValueError:
        return None


def summarise(samples: list[dict], start: float, end: float) -> dict | None:
    """The samples stamped within [start, end]: median and lowest SM clock, mean power, highest
    temperature, and the share of samples in which each of REASONS held the clock back."""
    window = [s for s in samples if start <= s["t"] <= end]
    if not window:
        return None
    clocks = [s["sm_mhz"] for s in window]
    held = {name: sum(bool(s["reasons"] & bit) for s in window) / len(window) for bit, name in REASONS.items()}
    return {
        "samples": len(window),
        "sm_mhz_median": statistics.median(clocks),
        "sm_mhz_min": min(clocks),
        "power_w_mean": statistics.fmean(s["power_w"] for s in window),
        "temp_c_max": max(s["temp_c"] for s in window),
        "held_back": {name: share for name, share in held.items() if share},  # e.g. {"power cap": 1.0}
    }


def nvidia_smi_id(torch_index: int) -> str:
    """The `nvidia-smi -i` name of PyTorch's CUDA device `torch_index`: nvidia-smi ignores
    CUDA_VISIBLE_DEVICES, whose entries (indices or UUIDs, both of which -i takes) PyTorch numbers from 0."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[torch_index] if torch_index < len(visible) else str(torch_index)


class ClockSampler:
    """`with ClockSampler(gpu) as clocks: ...` samples the card (`nvidia_smi_id`) every `period_ms` until
    the block ends; then `clocks.summary(start, end)`."""

    def __init__(self, gpu: str | int = 0, period_ms: int = 500, executable: str = "nvidia-smi"):
        self.samples: list[dict] = []
        self._command = [executable, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", str(period_ms),
                         "-i", str(gpu)]  # fmt: skip
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> ClockSampler:
        if shutil.which(self._command[0]) is not None:
            self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True, name="gpu-clock-sampler")
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:  # one line per sample, as nvidia-smi prints it
            sample = parse_sample(line)
            if sample is not None:
                self.samples.append(sample)

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a sampler must never hold up the benchmark
                self._process.kill()
                self._process.wait()
            self._reader.join(timeout=10)

    def summary(self, start: float, end: float) -> dict | None:
        return summarise(self.samples, start, end)
