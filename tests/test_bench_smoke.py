"""scripts/bench.py --smoke: the benchmark runs end to end on the tiny kit (CPU) and prints its table."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_home):
    """One --smoke run of every section the tests below look at (an interpreter start and a tiny kit
    each would cost more than the rows): the main rows, the baselines, inference, the LoRA rows around
    the cache stage, every training row tracing its second step (--trace 1:1)."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--steps", "2", "--only", "lora", "fp8", "full",
         "baselines", "inference", "cache_effect", "--trace", "1:1", "--work", str(work), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "errors" not in data, data.get("errors")
    return work, data, result.stdout


def test_bench_smoke(smoke):
    _, data, stdout = smoke
    for key in ("lora", "lora_fp8", "full", "ref_recipe", "plain_cached_lora", "plain_full"):
        assert data[key]["samples_per_s"] > 0, key
    assert data["inference"]["ours_s"] > 0 and data["inference"]["diffusers_peft_s"] > 0
    assert "gpu_state" in data["lora"] and "SM MHz" in stdout  # the card's clock beside each rate
    intervals = data["lora"]["intervals"]  # the steady logged intervals, each with its own rate
    assert [i["to_step"] for i in intervals] == [2] and intervals[0]["samples_per_s"] == data["lora"]["samples_per_s"]
    if shutil.which("nvidia-smi") is None:
        assert data["lora"]["gpu_state"] is None  # no card to ask: the row still runs
    assert "ours: LoRA r16 attn+ff" in stdout and "(a) reference recipe" in stdout
    assert "torch " in stdout and "diffusers " in stdout  # versions are part of the table


def test_bench_smoke_runs_lora_rows_around_the_cache_stage(smoke):
    """--only cache_effect: a LoRA row before the cache stage, one right after it and one after the idle
    (no wait under --smoke), in one process, each with its gpu_state."""
    _, data, stdout = smoke
    rows = ("lora_before_cache", "lora_after_cache", "lora_after_idle")
    assert all(data[k]["samples_per_s"] > 0 and "gpu_state" in data[k] for k in rows)
    assert data["cache_between"]["cache_images_per_s"] > 0 and "cache" not in data
    assert "ours: LoRA, right after it" in stdout


def test_bench_smoke_traces_a_rows_steps(smoke):
    """--trace on one process: each trained row's steps are traced (step_profile.py) and summarised."""
    work, data, _ = smoke
    assert (work / "lora" / "profile" / "rank0.json").is_file()
    for key in ("lora", "full", "lora_after_cache"):
        trace = data[key]["trace"]
        assert trace["host_step_ms"] > 0 and trace["nccl_kernels_ms"] == 0, key
        assert set(trace) == {"host_step_ms", "gpu_busy_ms", "nccl_kernels_ms", "host_sync_wait_ms", "gpu_idle"}


def _bench():
    """scripts/bench.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def test_gpu_idle_sums_the_gaps_between_kernels_by_size():
    gpu_idle = _bench().gpu_idle
    kernel = {"cat": "kernel"}
    events = [{"cat": "gpu_memcpy", "name": "load", "ts": -900, "dur": 10},  # before the first compute kernel
              {**kernel, "name": "gemm a", "ts": 0, "dur": 100}, {**kernel, "name": "b", "ts": 50, "dur": 100},
              {**kernel, "name": "c", "ts": 160, "dur": 10},  # 10 us after b ends (a and b overlap)
              {"cat": "gpu_memcpy", "name": "copy", "ts": 230, "dur": 10},  # 60 us
              {"cat": "cpu_op", "name": "host", "ts": 240, "dur": 5000},  # not GPU work
              {**kernel, "name": "flash d", "ts": 2240, "dur": 10},  # 2 ms
              {**kernel, "name": "gemm e", "ts": 100_000, "dur": 10},  # 98 ms: a checkpoint, left out
              {"cat": "gpu_memcpy", "name": "save", "ts": 100_500, "dur": 10}]  # fmt: skip  # after the last
    idle = gpu_idle(events, steps=2)
    assert idle["by_gap_size_ms_per_step"] == {"<20us": 0.005, "20-100us": 0.03, "0.1-1ms": 0.0, "1-50ms": 1.0}
    assert idle["idle_ms_per_step"] == 1.035
    assert idle["after_gaps_ms_per_step"] == {"flash d": 1.0, "copy": 0.03}
    assert gpu_idle([{"cat": "gpu_memcpy", "name": "load", "ts": 0, "dur": 1}], steps=1)["idle_ms_per_step"] == 0


def test_trace_summary_splits_a_traced_step_into_gpu_busy_collectives_and_host_waits():
    trace_summary = _bench().trace_summary
    kernel = {"cat": "kernel"}
    events = [{"cat": "user_annotation", "name": "ProfilerStep#2", "ts": 0, "dur": 1000},
              {"cat": "gpu_user_annotation", "name": "ProfilerStep#2", "ts": 0, "dur": 5000},  # the GPU's copy
              {"cat": "user_annotation", "name": "ProfilerStep#3", "ts": 1000, "dur": 3000},
              {**kernel, "name": "gemm a", "ts": 0, "dur": 400},
              {**kernel, "name": "ncclDevKernel_AllGather", "ts": 200, "dur": 400},  # overlaps a: 200 us more
              {**kernel, "name": "flash b", "ts": 1600, "dur": 400},  # after a 1 ms gap
              {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 1000, "dur": 600}]  # fmt: skip
    summary = trace_summary(events, steps=2)
    assert summary["host_step_ms"] == 2.0  # (1000 + 3000) us / 2, the GPU's annotation left out
    assert summary["gpu_busy_ms"] == 0.5  # union: 0-600 and 1600-2000 us, over 2 steps
    assert summary["nccl_kernels_ms"] == 0.2 and summary["host_sync_wait_ms"] == 0.3
    assert summary["gpu_idle"]["idle_ms_per_step"] == 0.5  # the 1 ms gap, over 2 steps


def test_kernel_groups_put_inductors_kernels_apart_from_the_matmuls():
    kernel_group = _bench().kernel_group
    # Inductor names a kernel after the ops it fuses: one that quantises a GEMM operator's input says "gemm"
    assert kernel_group("triton_poi_fused__to_copy_clamp_div_gelu_gemm_scaled_plus_lowrank_t_unsqueeze_15") == (
        "fused elementwise (triton)")
    assert kernel_group("_gemm_plus_lowrank_kernel") == "matmul"  # our Triton GEMM
    assert kernel_group("nvjet_sm90_tst_192x192_64x3_2x1_v_badd_coopB_NNN") == "matmul"
    assert kernel_group("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90") == "attention"
    assert kernel_group("void at::native::vectorized_elementwise_kernel<4, FillFunctor>") == (
        "elementwise / reduction (eager)")
    assert kernel_group("Memcpy HtoD (Pageable -> Device)") == "other"
