"""The speed switches keep the numerics: each fast path against the plain path on the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def setup(tiny_home, tmp_path_factory):
    from pixart_tune.cache import build_cache
    from pixart_tune.config import load_config
    from pixart_tune.features import CachedFeatures, collate
    from pixart_tune.models import resolve_base
    from pixart_tune.trainer import prepare_model

    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(REPO / "recipes" / "tiny-lora.yaml", [f"data.cache_dir={cache}", "lora.dropout=0"])
    base = resolve_base(cfg.model.base)
    features = CachedFeatures(build_cache(cfg, base, show_progress=False))
    same = [i for i, b in enumerate(features.buckets) if b == features.buckets[0]][:2]
    batch = collate([features[i] for i in same])
    model, transformer = prepare_model(cfg, base)
    # Give the LoRA non-zero B so the adapter path is exercised too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return cfg, base, features, batch, model, transformer


def _loss(setup, attention="auto", model=None):
    from pixart_tune.loss import LossFn, sample_generators

    cfg, base, features, batch, default_model, transformer = setup
    cfg = cfg.model_copy(deep=True)
    cfg.train.attention = attention
    fn = LossFn(cfg, base, transformer, features.null, "cpu")
    with torch.no_grad():
        return fn(model or default_model, batch, sample_generators(0, 3, 0, 0, 2, "cpu"))


@pytest.mark.parametrize("attention", ["math", "cudnn", "flash", "efficient"])
def test_attention_preference_keeps_the_loss(setup, attention):
    # On a CPU the preferred kernel may not exist: SDPA then falls back along our priority list.
    torch.testing.assert_close(_loss(setup, attention), _loss(setup, "auto"), rtol=1e-5, atol=1e-6)


def test_regional_compile_keeps_the_loss(setup):
    import copy

    from pixart_tune.speed import apply_compile, transformer_blocks

    cfg, base, features, batch, model, transformer = setup
    compiled = apply_compile(copy.deepcopy(model), "regional")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(compiled))
    torch.testing.assert_close(_loss(setup, model=compiled), _loss(setup), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_training_step_never_waits_for_the_gpu(setup):
    """The step's Python must stay ahead of the GPU: nothing in the loss, backward, clipping or AdamW
    step may synchronise with it (a blocking host-to-device copy, .item(), nonzero, ...). CUDA's
    sync-debug mode makes every such call raise. Once, a CPU table indexed by the GPU's timesteps did."""
    import copy

    from pixart_tune.loss import LossFn, sample_generators

    cfg, base, features, batch, model, transformer = setup
    model = copy.deepcopy(model).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fn = LossFn(cfg, base, transformer, features.null, "cuda")
    batch = {k: v.cuda() for k, v in batch.items()}

    def step(n):
        loss = fn(model, batch, sample_generators(0, n, 0, 0, 2, "cuda")).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step(0)  # first calls: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(n).detach() for n in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(x) for x in losses)


def _fake_flash_attn(monkeypatch, with_cute: bool) -> None:
    """A `flash_attn` package in sys.modules: FA4 (with flash_attn.cute) or FA2-like (without)."""
    import importlib.machinery
    import sys
    import types

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute") if with_cute else None)


@pytest.mark.parametrize(
    "capability, flash_attn, want",
    [((9, 0), "fa4", "fa4"), ((10, 0), "fa4", "fa4"), ((8, 9), "fa4", "cudnn"), ((9, 0), "fa2", "cudnn"),
     ((9, 0), None, "cudnn")],
)  # fmt: skip
def test_auto_attention_picks_the_fastest_this_machine_has(monkeypatch, capability, flash_attn, want):
    from pixart_tune.speed import resolve_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if flash_attn:
        _fake_flash_attn(monkeypatch, with_cute=flash_attn == "fa4")
    else:
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert resolve_attention("auto", "cuda") == want
    assert resolve_attention("cudnn", "cuda") == "cudnn" and resolve_attention("flash", "cuda") == "flash"
    assert resolve_attention("auto", "cpu") == "auto"  # SDPA's own choice off CUDA


def test_compile_options_ask_for_pdl_on_hopper_only(monkeypatch):
    """PDL is asked for on CUDA devices of compute capability 9.0+, never on a CPU or older GPUs, and
    an explicit TORCHINDUCTOR_ENABLE_PDL in the environment is left to Inductor."""
    from pixart_tune.speed import compile_options

    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    assert compile_options(torch.device("cpu")) == {}
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    assert compile_options(torch.device("cuda", 0)) == {"triton.enable_pdl": True}
    capability["value"] = (8, 0)
    assert compile_options(torch.device("cuda", 0)) == {}
    capability["value"] = (10, 0)
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "0")
    assert compile_options(torch.device("cuda", 0)) == {}


def test_compile_takes_the_pdl_option():
    """The option we pass is one this torch's Inductor knows (an unknown key fails the compile); on a CPU
    its codegen leaves PDL out and the result is unchanged."""
    import torch._inductor.config as inductor

    if not hasattr(inductor.triton, "enable_pdl"):
        pytest.skip("this torch's Inductor has no PDL option (compile_options then passes none)")
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(x * 2 + 1), options={"triton.enable_pdl": True})
    x = torch.randn(64, 48)
    torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x * 2 + 1))
