"""scripts/bench.py --smoke: the benchmark runs end to end on the tiny kit (CPU) and prints its table."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_smoke(tmp_path, tiny_home):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--steps", "2", "--only", "lora", "fp8", "full",
         "baselines", "inference", "--work", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "errors" not in data, data.get("errors")
    for key in ("lora", "lora_fp8", "full", "ref_recipe", "plain_cached_lora", "plain_full"):
        assert data[key]["samples_per_s"] > 0, key
    assert data["inference"]["ours_s"] > 0 and data["inference"]["diffusers_peft_s"] > 0
    assert "ours: LoRA r16 attn+ff" in result.stdout and "(a) reference recipe" in result.stdout
    assert "torch " in result.stdout and "diffusers " in result.stdout  # versions are part of the table
