"""`pixart-tune export | merge | convert | push` and their user errors, in-process through cli.main
(one subprocess checks the real entry point): every format round-trips to identical outputs, a
diffusers export loads in diffusers' own loader, merges match base + adapter, convert is exact."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_forward
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixart_tune.cli import main
from pixart_tune.convert import diffusers_to_original
from pixart_tune.inference import add_adapter
from pixart_tune.lora_formats import load_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain(tiny_base):
    return PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def run(tiny_base, plain, tmp_path_factory):
    """A run directory whose final/ is a PEFT adapter with random (init_lora_weights=False) weights."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
                        rank_pattern={"ff.net.2": 2}, init_lora_weights=False)  # fmt: skip
    model = get_peft_model(copy.deepcopy(plain), config)
    model.peft_config["default"].base_model_name_or_path = str(tiny_base)  # get_peft_model resets it
    model.save_pretrained(run / "final")
    return run


def forward(transformer, seed=1):
    return tiny_forward(transformer, seed)


def with_adapter(plain, adapter, scale=1.0, **kw):
    t = copy.deepcopy(plain)
    add_adapter(t, adapter, "x", scale=scale, **kw)
    return t


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def expected(plain, run):
    return forward(with_adapter(plain, run / "final"))


@pytest.mark.parametrize("fmt,name", [("peft", "peft-out"), ("diffusers", "lora.safetensors"), ("kohya", "kohya.safetensors")])
def test_export_then_import_gives_identical_outputs(capsys, tmp_path, run, plain, expected, fmt, name, tiny_base):
    code, out, err = cli(capsys, "export", run, "--format", fmt, "--out", tmp_path / name)
    assert code == 0, err
    assert out.startswith("wrote ") and fmt in out and "rank 4" in out
    exported = tmp_path / name
    assert torch.equal(forward(with_adapter(plain, exported)), expected)
    # ... and back to PEFT through the CLI: the very same tensors, alpha and base model.
    code, _, err = cli(capsys, "export", exported, "--format", "peft", "--out", tmp_path / "back")
    assert code == 0, err
    (a, _), (b, info_b) = load_lora(run / "final"), load_lora(tmp_path / "back")
    if fmt == "diffusers":  # that file carries alpha/r folded into B (exact here: powers of two)
        a = a.with_unit_scale()
    assert a.alphas == b.alphas and a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[m][i], b.layers[m][i]) for m in a.layers for i in (0, 1))
    assert info_b["base_model"] == str(tiny_base)
    assert torch.equal(forward(with_adapter(plain, tmp_path / "back")), expected)


def test_diffusers_export_loads_through_diffusers_own_peft_loader(capsys, tmp_path, run, tiny_base, expected):
    code, _, err = cli(capsys, "export", run, "--format", "diffusers", "--out", tmp_path)
    assert code == 0, err

    class T(PixArtTransformer2DModel, PeftAdapterMixin):
        pass

    t = T.from_pretrained(tiny_base, subfolder="transformer").eval()
    # Folder + weight_name, as diffusers documents it. (Given the file's own path and no use_safetensors=True,
    # diffusers 0.42 reads it without its header metadata: alpha is lost and every scale silently becomes 1.)
    t.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="ours", prefix="transformer")
    torch.testing.assert_close(forward(t), expected, rtol=1e-5, atol=1e-6)


def test_official_file_needs_assume_alpha_on_the_command_line(capsys, tmp_path, run, plain, expected):
    weights = load_file(run / "final" / "adapter_model.safetensors")
    official = tmp_path / "official.safetensors"
    save_file({f"unet.{k}": v for k, v in weights.items()}, official)
    code, out, err = cli(capsys, "export", official, "--format", "peft", "--out", tmp_path / "x")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, "one line, no traceback"
    assert str(official) in err and "--assume-alpha 8" in err
    code, out, err = cli(capsys, "export", official, "--format", "kohya", "--out", tmp_path / "k.safetensors",
                         "--assume-alpha", "8", "--base", "my/base")  # fmt: skip
    assert code == 0 and "alpha ASSUMED 8" in out, err
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["pixart_tune"])["base_model"] == "my/base"
    assert torch.equal(forward(with_adapter(plain, tmp_path / "k.safetensors")), expected)  # the run used alpha 8


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merge_matches_base_plus_adapter(capsys, tmp_path, run, plain, scale):
    code, out, err = cli(capsys, "merge", run, "--scale", scale, "--out", tmp_path / "merged")
    assert code == 0, err
    assert f"scale {scale:g}" in out
    merged = PixArtTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(forward(merged), forward(with_adapter(plain, run / "final", scale=scale)), rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / "merged" / "pixart_tune_merge.json").read_text())
    assert record["scale"] == scale and record["adapter"]["source"] == str(run)
    code, _, err = cli(capsys, "merge", run, "--out", tmp_path / "merged")
    assert code == 1 and "--overwrite" in err and str(tmp_path / "merged") in err


def test_merge_pipeline_folder_loads_as_a_pipeline(capsys, tmp_path, run, plain, tiny_base):
    code, _, err = cli(capsys, "merge", run / "final", "--out", tmp_path / "pipe", "--pipeline", "--dtype", "bf16")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == sorted(
        [p.name for p in tiny_base.iterdir() if not p.name.startswith(".")] + ["pixart_tune_merge.json"]
    )
    stored = load_file(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}, "--dtype bf16 is what is saved"
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")  # diffusers loads it as fp32 by default
    merged = pipe.transformer.eval()
    torch.testing.assert_close(forward(merged), forward(with_adapter(plain, run / "final")), rtol=0.05, atol=0.05)
    image = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
                 clean_caption=False, output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


def test_convert_round_trip_is_exact(capsys, tmp_path, plain):
    torch.manual_seed(0)
    original = diffusers_to_original(plain.state_dict(), extra={"pos_embed": plain.pos_embed.pos_embed.clone(),
                                                                "y_embedder.y_embedding": torch.randn(120, 32)})  # fmt: skip
    torch.save({"state_dict": original, "step": 7}, tmp_path / "ckpt.pth")
    heads = json.dumps({"num_attention_heads": 3, "attention_head_dim": 16})  # a head count is not in the weights
    code, out, err = cli(capsys, "convert", tmp_path / "ckpt.pth", "--out", tmp_path / "diffusers", "--config", heads)
    assert code == 0, err
    assert "diffusers transformer folder" in out
    assert torch.equal(forward(PixArtTransformer2DModel.from_pretrained(tmp_path / "diffusers")), forward(plain))
    code, out, err = cli(capsys, "convert", tmp_path / "diffusers", "--out", tmp_path / "back.safetensors", "--to", "original")
    assert code == 0, err
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # A config.json works as --config too, and the pipeline folder's transformer/ converts as well.
    code, _, err = cli(capsys, "convert", tmp_path / "back.safetensors", "--out", tmp_path / "again", "--config",
                       tmp_path / "diffusers" / "config.json")  # fmt: skip
    assert code == 0, err
    assert torch.equal(forward(PixArtTransformer2DModel.from_pretrained(tmp_path / "again")), forward(plain))


def test_user_errors_are_one_line_with_the_file_and_what_to_do(capsys, tmp_path, run, tiny_base):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "stray").mkdir()
    cases = [
        (["export", tmp_path / "missing", "--format", "peft", "--out", tmp_path / "o"], [str(tmp_path / "missing"), "no such file"]),
        (["export", tmp_path / "notes.txt", "--format", "peft", "--out", tmp_path / "o"], ["notes.txt", "not a LoRA weights file"]),
        (["export", tmp_path / "stray", "--format", "peft", "--out", tmp_path / "o"], ["stray", "run directory"]),
        (["export", run, "--format", "kohya", "--out", tmp_path / "k.bin"], ["k.bin", ".safetensors"]),
        (["merge", run, "--out", tmp_path / "m", "--base", tmp_path / "nope"], ["nope", "Hub id"]),
        (["merge", run, "--out", tmp_path / "m", "--base", tiny_base / "transformer", "--pipeline"], ["model_index.json"]),
        (["convert", tmp_path / "nope.pth", "--out", tmp_path / "c"], ["nope.pth", "no such file"]),
        (["convert", tmp_path / "notes.txt", "--out", tmp_path / "c"], ["notes.txt", ".pth or .safetensors"]),
        (["convert", tmp_path / "stray", "--out", tmp_path / "c.safetensors"], ["stray", "config.json"]),
        (["convert", tiny_base, "--out", tmp_path / "c.pth"], ["c.pth", ".safetensors"]),
        (["convert", tiny_base, "--out", tmp_path / "c.safetensors", "--to", "diffusers"], ["converts to original"]),
        (["generate", "--prompt", "x", "--lora", run, "--scale", "1", "--scale", "2", "--lora", run, "--lora", run],
         ["3 --lora but 2 --scale"]),
        (["generate", "--prompt", "x", "--base", tiny_base, "--device", "cpu", "--cpu-offload"], ["cpu_offload needs a CUDA GPU"]),
        (["generate", "--prompt", "x", "--base", tiny_base, "--scheduler", "heun", "--steps", "1"], ["unknown scheduler 'heun'"]),
    ]  # fmt: skip
    for args, needles in cases:
        code, out, err = cli(capsys, *args)
        assert code == 1 and out == "", args
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        for needle in needles:
            assert needle in err, (args, err)
    # Usage mistakes (argparse's) are one line too, pointing at the subcommand's help.
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "invalid choice: 'onnx'" in err and "pixart-tune export --help" in err


def test_push_goes_to_hub_push_to_hub(capsys, monkeypatch, run):
    from pixart_tune import hub

    calls = []
    monkeypatch.setattr(hub, "push_to_hub", lambda *a, **k: calls.append((a, k)) or "https://hub/user/name")
    code, _, err = cli(capsys, "push", run, "--repo", "user/name", "--private")
    assert code == 0, err
    code, _, err = cli(capsys, "push", run, "--repo", "user/name", "--base-model", "PixArt-alpha/PixArt-XL-2-1024-MS")
    assert code == 0, err
    assert calls == [((str(run), "user/name"), {"private": True, "base_model": None}),
                     ((str(run), "user/name"), {"private": False, "base_model": "PixArt-alpha/PixArt-XL-2-1024-MS"})]
    monkeypatch.setattr(hub, "push_to_hub", lambda *a, **k: (_ for _ in ()).throw(hub.HubError("no Hugging Face token: log in")))
    code, _, err = cli(capsys, "push", run, "--repo", "user/name")
    assert code == 1 and err == "error: no Hugging Face token: log in\n"


def test_the_installed_entry_point_reports_errors_the_same_way(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pixart_tune", "export", str(tmp_path / "missing"), "--format", "peft",
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "missing" in r.stderr


def test_a_dataset_with_nothing_usable_is_a_one_line_error(capsys, tmp_path, tiny_base):
    """Every example skipped (here one unreadable image): the cache summary, then one line naming the
    dataset and the report of reasons; no traceback."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "a.txt").write_text("a photo of a cat")
    code, out, err = cli(capsys, "train", REPO / "recipes" / "tiny-lora.yaml", f"output_dir={tmp_path / 'run'}",
                         f"data.path={bad}", f"model.base={tiny_base}", "train.log_with=none")  # fmt: skip
    assert code == 1 and "0 used, 1 skipped" in out
    last = err.rstrip("\n").split("\n")[-1]  # after the cache stage's progress bars
    assert last.startswith(f"error: {bad}: no usable examples: all 1 skipped") and "Traceback" not in err
    assert str(bad / ".pixart_tune_cache" / "skipped.jsonl") in last


def test_the_cli_drops_bitsandbytes_cpu_kernel_notice_only():
    """bitsandbytes' notice about its 4-bit CPU kernel (printed on import on AVX512-BF16 CPUs) is dropped
    once the CLI has run; its other warnings still reach the handlers."""
    import logging

    from pixart_tune.cli import quiet_third_party_notices

    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = Collect()
    log.addHandler(handler)
    try:
        quiet_third_party_notices()
        quiet_third_party_notices()  # twice (e.g. main() called twice in one process): one filter
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        log.warning("another bitsandbytes warning")
    finally:
        log.removeHandler(handler)
    assert seen == ["another bitsandbytes warning"] and len(log.filters) == 1
