"""scripts/gpu_clock.py: nvidia-smi's samples parsed, windowed and summarised; the sampler's process."""

import stat
import sys
import time
from datetime import datetime

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_clock  # noqa: E402

sys.path.pop(0)


def _line(t: float, rest: str) -> str:
    """A sample line as nvidia-smi writes it, stamped at Unix time t (in local time, to the millisecond)."""
    return datetime.fromtimestamp(t).strftime(gpu_clock.STAMP)[:-3] + ", " + rest


def test_a_sample_line_parses_and_anything_else_is_skipped():
    now = round(time.time(), 3)
    sample = gpu_clock.parse_sample(_line(now, "1785, 649.61, 63, 0x0000000000000004\n"))
    assert sample == {"t": pytest.approx(now, abs=1e-3), "sm_mhz": 1785.0, "power_w": 649.61, "temp_c": 63.0,
                      "reasons": 4}  # fmt: skip
    assert gpu_clock.parse_sample("2026/11/27 11:39:57.519, 1785, 649.61, 63, 0x4")["t"] == pytest.approx(
        datetime(2026, 11, 27, 11, 39, 57, 519000).timestamp())
    assert gpu_clock.parse_sample(_line(now, "1980, [N/A], 40, 0x0000000000000000")) is None  # a field not reported
    assert gpu_clock.parse_sample('Field "clocks_event_reasons.active" is not a valid field to query.') is None
    assert gpu_clock.parse_sample("") is None


def test_the_summary_keeps_the_window_and_counts_what_held_the_clock_back():
    rests = ["1980, 120, 40, 0x1",  # t0: idle, before the window
             "1785, 650, 61, 0x4", "1755, 662, 63, 0x4", "1830, 600, 62, 0x0", "1700, 690, 70, 0x24",  # t0+1..4
             "1980, 130, 50, 0x0"]  # t0+5: after the window  # fmt: skip
    t0 = float(int(time.time()))
    samples = [gpu_clock.parse_sample(_line(t0 + i, rest)) for i, rest in enumerate(rests)]
    summary = gpu_clock.summarise(samples, t0 + 1, t0 + 4)
    assert summary["samples"] == 4
    assert summary["sm_mhz_median"] == pytest.approx((1755 + 1785) / 2) and summary["sm_mhz_min"] == 1700
    assert summary["power_w_mean"] == pytest.approx((650 + 662 + 600 + 690) / 4) and summary["temp_c_max"] == 70
    assert summary["held_back"] == {"power cap": 0.75, "thermal (software)": 0.25}  # idle (0x1) is not counted
    assert gpu_clock.summarise(samples, t0 + 10, t0 + 20) is None


def test_the_sampler_reads_a_looping_nvidia_smi_until_the_block_ends(tmp_path):
    """A stand-in nvidia-smi that records its arguments, prints a stamped sample every 20 ms and runs until stopped."""
    fake, args = tmp_path / "nvidia-smi", tmp_path / "args.txt"
    fake.write_text(f"#!{sys.executable}\n"
                    "import datetime, sys, time\n"
                    f"open({str(args)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
                    "while True:\n"
                    f"    stamp = datetime.datetime.now().strftime({gpu_clock.STAMP!r})[:-3]\n"
                    "    print(stamp + ', 1785, 649.61, 63, 0x0000000000000004', flush=True)\n"
                    "    time.sleep(0.02)\n")  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    start = time.time() - 1  # the stamps are to the millisecond
    with gpu_clock.ClockSampler("1", period_ms=20, executable=str(fake)) as clocks:
        deadline = time.time() + 20
        while len(clocks.samples) < 3 and time.time() < deadline:
            time.sleep(0.02)
    assert clocks._process.poll() is not None  # stopped with the block
    count = len(clocks.samples)
    time.sleep(0.1)
    assert len(clocks.samples) == count >= 3  # nothing arrives after
    assert args.read_text().split() == [f"--query-gpu={gpu_clock.FIELDS}", "--format=csv,noheader,nounits", "-lms", "20",
                                        "-i", "1"]  # fmt: skip
    summary = clocks.summary(start, time.time() + 1)
    assert summary["samples"] == count and summary["held_back"] == {"power cap": 1.0}
    assert clocks.summary(start - 60, start) is None  # the window picks by nvidia-smi's stamps


def test_without_nvidia_smi_there_are_no_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi on the path
    with gpu_clock.ClockSampler() as clocks:
        pass
    assert clocks.samples == [] and clocks.summary(0.0, time.time()) is None


def test_the_card_is_named_as_nvidia_smi_numbers_it(monkeypatch):
    """nvidia-smi ignores CUDA_VISIBLE_DEVICES: PyTorch's device 0 may be the machine's card 3."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_clock.nvidia_smi_id(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-8f2c")
    assert gpu_clock.nvidia_smi_id(0) == "3" and gpu_clock.nvidia_smi_id(1) == "GPU-8f2c"
