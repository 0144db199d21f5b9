"""The inference helper on the tiny kit (sample_size 128, so 1024-MS micro-conditions and binning
are live): non-square sizes, seeds, schedulers, several adapters with scales switched without a
reload, fuse/unfuse parity, adapters in every format, the low-VRAM switches, the latency timer."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import shutil

import pytest
import torch
from conftest import tiny_forward
from diffusers import PixArtTransformer2DModel
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file

from pixart_tune.inference import (
    SCHEDULERS,
    AdapterError,
    adapters,
    add_adapter,
    benchmark_latency,
    fuse_adapters,
    generate,
    is_fused,
    load_pipeline,
    remove_adapter,
    resolve_adapter,
    set_adapters,
    set_scheduler,
    unfuse_adapters,
)
from pixart_tune.lora_formats import Lora, MissingAlphaError, load_lora, save_lora

SMALL = {"height": 64, "width": 64, "steps": 2, "resolution_binning": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lora(base_dir, out, targets, seed) -> str:
    """A 'trained' PEFT adapter in seconds: random A and B (init_lora_weights=False), saved by peft."""
    transformer = PixArtTransformer2DModel.from_pretrained(base_dir, subfolder="transformer")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(transformer, config)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)  # get_peft_model resets it
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def loras(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(tiny_base, root / "a", ["to_q", "to_k", "to_v", "to_out.0"], seed=1)
    b = make_lora(tiny_base, root / "b", ["to_k", "ff.net.0.proj", "ff.net.2"], seed=2)
    return a, b


@pytest.fixture(scope="module")
def pipe(tiny_base, loras):
    """One pipeline with adapter0 = a at 1.0 and adapter1 = b at 0.0; tests reset scales they change."""
    a, b = loras
    p = load_pipeline(str(tiny_base), lora={a: 1.0, b: 0.0}, device="cpu", dtype="fp32")
    p.set_progress_bar_config(disable=True)
    return p


def forward(transformer, seed=1):
    return tiny_forward(transformer, seed, width=24)


def pixels(path) -> torch.Tensor:
    image = Image.open(path)
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


@pytest.fixture(scope="module")
def plain(tiny_base):
    return PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").eval()


# ---- generation --------------------------------------------------------------------------------


def test_non_square_with_binning_gives_exactly_the_asked_size(pipe, loras, tmp_path):
    paths = generate(pipe, "a photo of a cat", out=tmp_path / "cat.png", height=256, width=384, steps=2, seed=3)
    assert paths == [tmp_path / "cat.png"]
    assert Image.open(paths[0]).size == (384, 256)
    params = json.loads((tmp_path / "cat.json").read_text())
    generated = (params["generated_height"], params["generated_width"])
    assert generated in {(int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values()}, "a 1024-MS bucket"
    assert abs(generated[0] / generated[1] - 2 / 3) < 0.05 and generated != (256, 384)
    assert params["resolution_binning"] and params["scheduler"] == "dpm-solver" and params["seeds"] == [3]
    assert [(x["name"], x["scale"], x["source"]) for x in params["adapters"]] == [("adapter0", 1.0, loras[0]), ("adapter1", 0.0, loras[1])]
    assert params["dtype"] == "float32" and params["fused"] is False and params["files"] == [str(paths[0])]
    # And without binning the transformer runs at the asked (non-square) size itself.
    generate(pipe, "a photo of a cat", out=tmp_path / "exact.png", height=64, width=96, steps=2, resolution_binning=False)
    assert Image.open(tmp_path / "exact.png").size == (96, 64)


def test_one_seed_per_image_reproducible_and_independent_of_the_batch(pipe, tmp_path):
    prompts = ["a photo of a cat", "a red apple on a table"]
    paths = generate(pipe, prompts, out=tmp_path / "batch", seed=[5, 6], negative_prompt="blurry", guidance_scale=3.0, **SMALL)
    assert [p.name for p in paths] == ["000.png", "001.png"]
    params = json.loads((tmp_path / "batch" / "000.json").read_text())
    assert params["seeds"] == [5, 6] and params["prompt"] == prompts and params["negative_prompt"] == "blurry"
    assert params["guidance_scale"] == 3.0 and params["steps"] == 2
    again = generate(pipe, prompts[1], out=tmp_path / "alone.png", seed=6, negative_prompt="blurry", guidance_scale=3.0, **SMALL)
    assert (pixels(paths[1]) - pixels(again[0])).abs().max() <= 1, "image 2 depends on its seed, not on the batch"
    assert (pixels(paths[0]) - pixels(paths[1])).abs().mean() > 1
    two = generate(pipe, prompts[0], out=tmp_path / "two", seed=7, images_per_prompt=2, **SMALL)
    assert json.loads((tmp_path / "two" / "000.json").read_text())["seeds"] == [7, 8]
    assert (pixels(two[0]) - pixels(two[1])).abs().mean() > 1, "seed, seed+1: two different images"
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        generate(pipe, prompts, out=tmp_path / "x", seed=[1, 2, 3], **SMALL)


def test_every_scheduler_runs_and_is_recorded(pipe, tmp_path):
    original = dict(pipe.scheduler.config)
    outputs = {}
    try:
        for name in SCHEDULERS:
            path = generate(pipe, "a photo of a cat", out=tmp_path / f"{name}.png", scheduler=name, seed=1, **SMALL)[0]
            params = json.loads(path.with_suffix(".json").read_text())
            assert params["scheduler"] == name and params["scheduler_class"] == SCHEDULERS[name]
            outputs[name] = pixels(path)
            assert outputs[name].std() > 1, f"{name}: not a flat image"
        assert (outputs["ddim"] - outputs["euler-a"]).abs().mean() > 0.5, "the samplers really differ"
        # Back to the default: built from the checkpoint's own config, not from the last sampler's.
        generate(pipe, "a photo of a cat", out=tmp_path / "back.png", scheduler="dpm-solver", seed=1, **SMALL)
        assert pipe.scheduler.config["algorithm_type"] == original["algorithm_type"] == "dpmsolver++"
        assert torch.equal(pixels(tmp_path / "back.png"), outputs["dpm-solver"])
        with pytest.raises(ValueError, match="unknown scheduler 'heun'.*euler-a"):
            generate(pipe, "x", out=tmp_path / "bad.png", scheduler="heun", **SMALL)
    finally:
        set_scheduler(pipe, "dpm-solver")


# ---- adapters ------------------------------------------------------------------------------------


def test_two_adapters_with_scales(pipe, loras, plain):
    a, b = loras
    t = pipe.transformer
    only_a = PeftModel.from_pretrained(copy.deepcopy(plain), a).eval()
    only_b = PeftModel.from_pretrained(copy.deepcopy(plain), b).eval()
    try:
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 0.0})
        torch.testing.assert_close(forward(t), forward(only_a), rtol=1e-5, atol=1e-6)
        set_adapters(pipe, {"adapter0": 0.0, "adapter1": 1.0})
        torch.testing.assert_close(forward(t), forward(only_b), rtol=1e-5, atol=1e-6)
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 1.0})
        both = forward(t)
        assert (both - forward(only_a)).abs().max() > 1e-3 and (both - forward(only_b)).abs().max() > 1e-3
        set_adapters(pipe, {})
        torch.testing.assert_close(forward(t), forward(plain), rtol=0, atol=0)
    finally:
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 0.0})
    assert {n: x["scale"] for n, x in adapters(pipe).items()} == {"adapter0": 1.0, "adapter1": 0.0}


def test_switching_scales_needs_no_reload_and_switching_back_is_exact(pipe, tmp_path):
    t = pipe.transformer
    params_before = {n: id(p) for n, p in t.named_parameters()}
    first = forward(t)
    image = generate(pipe, "a photo of a cat", out=tmp_path / "a.png", seed=2, **SMALL)[0]
    try:
        set_adapters(pipe, {"adapter0": 0.5, "adapter1": 1.0})
        assert (forward(t) - first).abs().max() > 1e-3
        other = generate(pipe, "a photo of a cat", out=tmp_path / "b.png", seed=2, **SMALL)[0]
        assert (pixels(other) - pixels(image)).abs().mean() > 0.5, "the new scales change the image"
        with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; loaded: \['adapter0', 'adapter1'\]"):
            set_adapters(pipe, {"nope": 1.0})
    finally:
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 0.0})
    assert torch.equal(forward(t), first)
    back = generate(pipe, "a photo of a cat", out=tmp_path / "c.png", seed=2, **SMALL)[0]
    assert torch.equal(pixels(back), pixels(image))
    assert {n: id(p) for n, p in t.named_parameters()} == params_before, "same tensors: nothing was reloaded"


def test_fuse_and_unfuse_parity(pipe, loras):
    t = pipe.transformer
    base_weights = {n: p.detach().clone() for n, p in t.named_parameters() if "base_layer" in n}
    try:
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 0.7})
        unfused = forward(t)
        fuse_adapters(pipe)
        assert is_fused(pipe)
        assert type(t.transformer_blocks[0].attn1.to_q) is torch.nn.Linear, "no peft wrapper left to call per step"
        fused_weights = dict(t.named_parameters())  # the plain layers' own names now: no .base_layer
        assert any(not torch.equal(fused_weights[n.replace(".base_layer", "")], w) for n, w in base_weights.items())
        torch.testing.assert_close(forward(t), unfused, rtol=1e-4, atol=1e-5)
        set_adapters(pipe, {"adapter0": 0.5, "adapter1": 0.0})  # rescaling while fused: unfold, rescale, refold
        assert is_fused(pipe)
        fused_half = forward(t)
        add_adapter(pipe, loras[1], "b-again", scale=0.5)  # adding and removing refold as well
        assert is_fused(pipe) and (forward(t) - fused_half).abs().max() > 1e-4
        remove_adapter(pipe, "b-again")
        assert is_fused(pipe)
        torch.testing.assert_close(forward(t), fused_half, rtol=1e-4, atol=1e-5)
        unfuse_adapters(pipe)
        assert not is_fused(pipe) and type(t.transformer_blocks[0].attn1.to_q).__name__ == "Linear"
        assert hasattr(t.transformer_blocks[0].attn1.to_q, "lora_A"), "the peft layer is back"
        torch.testing.assert_close(forward(t), fused_half, rtol=1e-4, atol=1e-5)
        for n, p in t.named_parameters():
            if n in base_weights:
                torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6, msg=n)
    finally:
        unfuse_adapters(pipe)
        set_adapters(pipe, {"adapter0": 1.0, "adapter1": 0.0})


def test_adapters_in_every_file_format_and_the_official_alpha(tmp_path, loras, plain):
    a, _ = loras
    expected = forward(PeftModel.from_pretrained(copy.deepcopy(plain), a).eval())
    lora, _ = load_lora(a)
    shutil.copytree(a, tmp_path / "run" / "final")
    files = {
        "diffusers": save_lora(tmp_path / "d", lora, format="diffusers"),
        "kohya": save_lora(tmp_path / "k.safetensors", lora, format="kohya"),
        "run dir": tmp_path / "run",
    }
    assert resolve_adapter(tmp_path / "run") == tmp_path / "run" / "final"
    for what, path in files.items():
        t = copy.deepcopy(plain)
        info = add_adapter(t, path, "x")
        torch.testing.assert_close(forward(t), expected, rtol=1e-5, atol=1e-6, msg=what)
        assert info["alpha_assumed"] is False
    # The official script's file: PEFT keys under unet.base_model.model., no alpha anywhere.
    peft_weights = load_file(f"{a}/adapter_model.safetensors")
    save_file({f"unet.{k}": v for k, v in peft_weights.items()}, tmp_path / "official.safetensors")
    with pytest.raises(MissingAlphaError, match="assume_alpha=8"):
        add_adapter(copy.deepcopy(plain), tmp_path / "official.safetensors", "x")
    t = copy.deepcopy(plain)
    info = add_adapter(t, tmp_path / "official.safetensors", "x", assume_alpha="rank")  # this one was trained at alpha = rank
    assert info["alpha_assumed"] is True and info["format"] == "official"
    torch.testing.assert_close(forward(t), expected, rtol=1e-5, atol=1e-6)


def test_adapter_lookup_errors_name_the_path(tmp_path, pipe):
    with pytest.raises(AdapterError, match=r"nowhere/at-all.*no such file or folder"):
        resolve_adapter(tmp_path / "nowhere" / "at-all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty: holds no LoRA"):
        resolve_adapter(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AdapterError, match=r"notes.txt: not a LoRA weights file"):
        resolve_adapter(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(AdapterError, match=r"junk.safetensors"):
        add_adapter(pipe, tmp_path / "junk.safetensors", "junk")
    with pytest.raises(ValueError, match="already loaded"):
        add_adapter(pipe, tmp_path / "junk.safetensors", "adapter0")


def test_a_lora_for_another_model_is_refused_and_leaves_no_trace(pipe, tmp_path):
    t = pipe.transformer
    before, names = forward(t), sorted(adapters(pipe))
    wrong_shape = Lora.uniform({"transformer_blocks.0.attn1.to_q": (torch.ones(2, 99), torch.ones(48, 2))}, 2)
    wrong_place = Lora.uniform({"transformer_blocks.7.attn1.to_q": (torch.ones(2, 48), torch.ones(48, 2))}, 2)
    for what, lora in {"shape": wrong_shape, "place": wrong_place}.items():
        path = save_lora(tmp_path / f"{what}.safetensors", lora, format="kohya" if what == "shape" else "diffusers")
        with pytest.raises(AdapterError, match=f"{what}.safetensors: does not fit this transformer"):
            add_adapter(pipe, path, "foreign")
        assert sorted(adapters(pipe)) == names and torch.equal(forward(t), before), what
    # remove_adapter unloads one adapter and keeps the others as they were.
    shutil.copytree(pipe.transformer._pixart_adapters["adapter0"]["source"], tmp_path / "a-copy")
    add_adapter(pipe, tmp_path / "a-copy", "extra", scale=0.5)
    assert (forward(t) - before).abs().max() > 1e-4
    remove_adapter(pipe, "extra")
    assert sorted(adapters(pipe)) == names and torch.equal(forward(t), before)
    assert not any("extra" in n for n, _ in t.named_parameters())


# ---- low VRAM, speed -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard")
def test_cpu_offload_is_refused_on_cpu_with_a_reason(tiny_base):
    with pytest.raises(ValueError, match="cpu_offload needs a CUDA GPU"):
        load_pipeline(str(tiny_base), device="cpu", cpu_offload=True)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_t5_and_vae_switches(tiny_base, loras, tmp_path, bits):
    """bitsandbytes runs T5 in 8 and 4 bit on CPU too (0.45+); its prompt embedding stays close to fp32's.
    transformers keeps T5's `wo` unquantised; in 4 bit so are linears narrower than bitsandbytes' 64-value
    blocks (0.49+ fails on them on the CPU): all of the tiny T5's 32-wide ones (the next test has a T5
    wide enough for 4 bit)."""
    pytest.importorskip("bitsandbytes")
    pipe = load_pipeline(str(tiny_base), lora=loras[0], device="cpu", dtype="fp32", t5_quantization=bits,
                         vae_tiling=True, vae_slicing=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    kinds = {name.split(".")[-1]: type(m).__name__ for name, m in pipe.text_encoder.named_modules()
             if hasattr(m, "in_features")}  # fmt: skip
    assert kinds.pop("wo") == "Linear" and {"q", "k", "v", "o"} < kinds.keys()  # and wi (or wi_0, wi_1)
    assert set(kinds.values()) == {"Linear8bitLt" if bits == "8bit" else "Linear"}
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    from pixart_tune.models import load_text_encoder

    full = load_text_encoder(str(tiny_base), torch.float32)
    ids = pipe.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        e_q, e_full = pipe.text_encoder(ids)[0], full(ids)[0]
    assert torch.nn.functional.cosine_similarity(e_q.flatten(), e_full.flatten(), dim=0) > 0.98
    path = generate(pipe, "a photo of a cat", out=tmp_path / "q.png", seed=1, **SMALL)[0]
    assert pixels(path).std() > 1
    assert json.loads(path.with_suffix(".json").read_text())["t5_quantization"] == bits


def test_4bit_t5_quantizes_each_linear_that_fills_whole_blocks(tmp_path):
    """A T5 64 wide (q/k/v/o and wi take 64-value inputs): those load as bitsandbytes' Linear4bit, its
    encodings stay close to fp32's; `wo` (transformers keeps it unquantised) and nothing else stays."""
    pytest.importorskip("bitsandbytes")
    from transformers import T5Config, T5EncoderModel

    from pixart_tune.models import load_text_encoder

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, dropout_rate=0.0)
    T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder")
    # bitsandbytes' 4-bit CPU GEMM is faster with `kernels`: said here, as the CLI drops bitsandbytes' own notice
    advised = not torch.cuda.is_available() and importlib.util.find_spec("kernels") is None
    with pytest.warns(UserWarning, match="pip install kernels") if advised else contextlib.nullcontext():
        quantized = load_text_encoder(str(tmp_path), torch.float32, "4bit")
    kinds = {name.split(".")[-1]: type(m).__name__ for name, m in quantized.named_modules() if hasattr(m, "in_features")}
    assert kinds == {"q": "Linear4bit", "k": "Linear4bit", "v": "Linear4bit", "o": "Linear4bit", "wi": "Linear4bit",
                     "wo": "Linear"}  # fmt: skip
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        e_q, e_full = quantized(ids)[0], load_text_encoder(str(tmp_path), torch.float32)(ids)[0]
    assert torch.nn.functional.cosine_similarity(e_q.flatten(), e_full.flatten(), dim=0) > 0.95


def test_benchmark_latency_times_whole_calls(pipe):
    seconds = benchmark_latency(pipe, steps=2, height=64, width=64, runs=2, use_resolution_binning=False)
    assert 0 < seconds < 30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_offload_fuse_compile_and_timer(tiny_base, loras):
    pipe = load_pipeline(str(tiny_base), lora=loras[0], cpu_offload=True, fuse=True)
    assert is_fused(pipe)
    image = pipe("a photo of a cat", height=256, width=256, num_inference_steps=2).images[0]
    assert image.size == (256, 256)
    fast = load_pipeline(str(tiny_base), lora=loras[0], fuse=True, compile=True)
    assert benchmark_latency(fast, steps=4, height=512, width=512, runs=2) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_transformer_matches_eager_on_gpu(tiny_base, loras):
    """compile=True changes kernels, not results: the same seed gives the same latents (bf16 tolerance)."""

    def latents(compile: bool) -> torch.Tensor:
        pipe = load_pipeline(str(tiny_base), lora=loras[0], fuse=True, compile=compile)
        return pipe("a photo of a cat", height=256, width=256, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(3)).images.float()  # fmt: skip

    eager, compiled = latents(False), latents(True)
    assert float((compiled - eager).norm() / eager.norm()) < 0.02


def test_generate_cli_exposes_the_switches(tiny_base, loras, tmp_path, capsys):
    from pixart_tune.cli import main

    a, b = loras
    code = main(["generate", "--prompt", "a photo of a cat", "--prompt", "a red apple", "--lora", a, "--lora", b,
                 "--scale", "0.8", "--scale", "0.3", "--base", str(tiny_base), "--height", "64", "--width", "96",
                 "--no-binning", "--steps", "2", "--scheduler", "euler-a", "--seed", "11", "--seed", "12",
                 "--negative-prompt", "blurry", "--guidance-scale", "3", "--t5-quantization", "8bit", "--vae-tiling",
                 "--vae-slicing", "--fuse", "--device", "cpu", "--dtype", "fp32", "--no-clean-caption",
                 "--out", str(tmp_path / "cli")])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("wrote ") and "000.json" in out.out
    params = json.loads((tmp_path / "cli" / "000.json").read_text())
    assert [Image.open(f).size for f in params["files"]] == [(96, 64), (96, 64)]
    assert {k: params[k] for k in ("scheduler", "seeds", "steps", "guidance_scale", "negative_prompt", "fused",
                                   "t5_quantization", "vae_tiling", "vae_slicing", "clean_caption", "resolution_binning")} == {
        "scheduler": "euler-a", "seeds": [11, 12], "steps": 2, "guidance_scale": 3.0, "negative_prompt": "blurry",
        "fused": True, "t5_quantization": "8bit", "vae_tiling": True, "vae_slicing": True, "clean_caption": False,
        "resolution_binning": False}  # fmt: skip
    assert [(x["source"], x["scale"]) for x in params["adapters"]] == [(a, 0.8), (b, 0.3)]
    # Without --base the adapter's recorded base is used; without --seed it is 0.
    assert main(["generate", "--prompt", "a cat", "--lora", a, "--height", "64", "--width", "64", "--no-binning",
                 "--steps", "2", "--out", str(tmp_path / "d.png")]) == 0  # fmt: skip
    params = json.loads((tmp_path / "d.json").read_text())
    assert params["base"] == str(tiny_base) and params["seeds"] == [0]
