"""Shared fixtures: the embedded tiny PixArt written once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"

# Tests never touch the network; the Hub client fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    """A private PIXART_TUNE_HOME so tests build the embedded tiny model from scratch, once."""
    home = tmp_path_factory.mktemp("pixart_tune_home")
    old = os.environ.get("PIXART_TUNE_HOME")
    os.environ["PIXART_TUNE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("PIXART_TUNE_HOME", None)
    else:
        os.environ["PIXART_TUNE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_base(tiny_home) -> Path:
    """Folder of the embedded tiny pipeline in the Hub layout."""
    from pixart_tune.tiny import embedded_tiny_path

    return embedded_tiny_path()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine threads cost ~5x.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_forward(transformer, seed: int = 1, width: int = 16, grad: bool = False) -> torch.Tensor:
    """One forward pass of a tiny transformer on fixed random inputs: latents (2, 4, 16, width), 7 caption
    tokens (the second caption padded), 1024-MS micro-conditions matching the latent size. `grad`:
    keep the autograd graph (for a backward through it)."""
    g = torch.Generator().manual_seed(seed)
    height_px, width_px = 16 * 8.0, width * 8.0
    with torch.set_grad_enabled(grad):
        return transformer(
            hidden_states=torch.randn(2, 4, 16, width, generator=g),
            encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
            timestep=torch.tensor([10, 700]),
            encoder_attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
            added_cond_kwargs={"resolution": torch.tensor([[height_px, width_px]] * 2),
                               "aspect_ratio": torch.tensor([[height_px / width_px]] * 2)},
        ).sample  # fmt: skip


def tiny_out_and_grads(model, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """tiny_forward's output and, after a backward of its mean square, every trainable parameter's
    gradient by name (the gradients are zeroed first)."""
    model.zero_grad()
    out = tiny_forward(model, seed, grad=True)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_lora(tiny_base, **settings):
    """The tiny transformer with a rank-4 LoRA (LoraConfig `settings` on top of rank 4, no dropout)
    whose B matrices are non-zero, so the adapter changes the output (peft starts with B = 0)."""
    from diffusers import PixArtTransformer2DModel

    from pixart_tune.config import LoraConfig
    from pixart_tune.lora import add_lora

    transformer = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")
    model = add_lora(transformer, LoraConfig(**{"rank": 4, "dropout": 0.0, **settings}), str(tiny_base))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Two weight dicts hold the same names and, per name, values equal within `atol` (no relative slack)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_compiled_block_is_one_graph(block, x, kwargs) -> None:
    """torch.compile(block) (aot_eager, fullgraph) is one graph, and its output and the gradients of x
    and the trainable parameters equal eager's."""
    from torch._dynamo.utils import counters

    trainable = [p for p in block.parameters() if p.requires_grad]

    def run(fn):
        out = fn(x, **kwargs)
        return out, *torch.autograd.grad(out.square().sum(), [x, *trainable])

    eager = run(block)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
