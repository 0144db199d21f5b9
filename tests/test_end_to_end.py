"""The walking skeleton end to end on the embedded tiny PixArt and data/sample:
train a LoRA from the shipped recipe, load it three ways, generate with and without it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from PIL import Image

RECIPE = REPO / "recipes" / "tiny-lora.yaml"
FAST = ["train.steps=30", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_home):
    """One tiny LoRA run shared by the tests below (cache in a private folder)."""
    from pixart_tune import train

    run = tmp_path_factory.mktemp("run")
    final = train(RECIPE, [f"output_dir={run}", f"data.cache_dir={run / 'cache'}", *FAST], show_progress=False)
    return run, final


def test_run_dir_holds_adapter_config_and_metrics(trained):
    run, final = trained
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    base = adapter_cfg["base_model_name_or_path"]
    assert (REPO / base).is_dir() or __import__("pathlib").Path(base).is_dir(), "records the tiny kit's folder"
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 30
    times = [line["time"] for line in lines]  # Unix seconds: when each interval ended
    assert times == sorted(times) and time.time() - 3600 < times[0] <= times[-1] <= time.time()


def test_loss_falls_on_sample_data(trained):
    """Fixed seed: the LoRA lowers the objective on data/sample, measured with identical noise."""
    from pixart_tune.evaluate import dataset_loss

    run, final = trained
    before = dataset_loss(run / "config.yaml", lora=None)
    after = dataset_loss(run / "config.yaml", lora=final)
    assert after < before * 0.95, (before, after)


def test_plain_peft_loading_matches_ours(trained, tiny_base):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from pixart_tune import load_pipeline

    run, final = trained
    ours = load_pipeline(str(tiny_base), lora=str(final), device="cpu", dtype="fp32").transformer
    plain = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer"), final)
    base = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 24, generator=g)
    kw = dict(
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g), timestep=torch.tensor([10, 500]),
        encoder_attention_mask=torch.ones(2, 7),
        added_cond_kwargs={"resolution": torch.tensor([[256.0, 192.0]] * 2), "aspect_ratio": torch.tensor([[4 / 3]] * 2)},
    )  # fmt: skip
    with torch.no_grad():
        a, b, c = ours(x, **kw).sample, plain(x, **kw).sample, base(x, **kw).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (a - c).abs().max() > 1e-4, "the adapter changes the output"


def test_train_is_reproducible(trained, tmp_path):
    """Training again from the run's resolved config.yaml gives the same adapter weights."""
    from safetensors.torch import load_file

    from pixart_tune import train

    run, final = trained
    again = train(run / "config.yaml", [f"output_dir={tmp_path}"], show_progress=False)
    a, b = load_file(final / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pixart_tune", *args], cwd=cwd, capture_output=True, text=True)


def test_generate_cli_size_seed_and_adapter(trained, tmp_path, capsys, monkeypatch):
    """The first case goes through the real entry point; the others call cli.main in-process
    (same code, without another interpreter start each). One thread: the tiny model gains nothing
    from two, and on a busy 2-core box they make it ~5x slower."""
    from pixart_tune.cli import main

    _, final = trained
    common = ["--prompt", "a photo of a cat", "--steps", "4", "--height", "256", "--width", "384"]
    out = {}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in {
            "a": ["--lora", str(final), "--seed", "1"],
            "b": ["--lora", str(final), "--seed", "2"],
            "base": ["--lora", str(final), "--scale", "0", "--seed", "1"],
        }.items():
            args = ["generate", *common, *extra, "--out", str(tmp_path / f"{name}.png")]
            if name == "a":
                r = _cli(*args)
                returncode, stdout, stderr = r.returncode, r.stdout, r.stderr
            else:
                capsys.readouterr()
                returncode = main(args)
                stdout, stderr = capsys.readouterr()
            assert returncode == 0, stderr
            assert "wrote" in stdout
            out[name] = torch.tensor(list(Image.open(tmp_path / f"{name}.png").getdata()), dtype=torch.float32)
            assert Image.open(tmp_path / f"{name}.png").size == (384, 256)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "a.json").read_text())["seed"] == 1
    assert (out["a"] - out["b"]).abs().mean() > 1.0, "another seed gives another image"
    assert (out["a"] - out["base"]).abs().mean() > 0.5, "the adapter changes the image"


def test_cli_rejects_bad_keys(tmp_path, capsys):
    """The first case through the real entry point, the second through cli.main in-process (same code)."""
    from pixart_tune.cli import main

    r = _cli("train", str(RECIPE), "train.lerning_rate=1", f"output_dir={tmp_path}")
    assert r.returncode != 0
    assert "train.lerning_rate" in r.stderr and "train.lr" in r.stderr
    capsys.readouterr()
    assert main(["train", str(RECIPE), "train.steps=abc", f"output_dir={tmp_path}"]) != 0
    stderr = capsys.readouterr().err
    assert "train.steps" in stderr and "integer" in stderr
    assert not (tmp_path / "final").exists()
