"""Merging a LoRA into the weights gives the adapted model's output, at any scale."""

import copy

import pytest
import torch
from conftest import tiny_forward
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from pixart_tune.lora_formats import lora_from_peft_model, save_lora
from pixart_tune.merge import merge_lora_into_transformer, merge_lora_to_folder
from pixart_tune.tiny import TINY_TRANSFORMER

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "pos_embed.proj"]  # + a Conv2d


pytestmark = pytest.mark.usefixtures("one_thread")


def forward(model, seed=1):
    return tiny_forward(model, seed).float()


@pytest.fixture(scope="module")
def base_and_adapted():
    torch.manual_seed(0)
    base = PixArtTransformer2DModel(**TINY_TRANSFORMER).eval()
    adapted = copy.deepcopy(base)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        rank_pattern={"^transformer_blocks.1.ff.net.2": 2}, alpha_pattern={"to_k": 3.0})
    inject_adapter_in_model(config, adapted)
    return base, adapted


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_equals_base_plus_adapter(base_and_adapted, scale):
    base, adapted = base_and_adapted
    lora = lora_from_peft_model(adapted)
    assert "pos_embed.proj" in lora.layers and lora.layers["pos_embed.proj"][0].ndim == 4
    for module in adapted.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)
    expected = forward(adapted)
    merged = merge_lora_into_transformer(copy.deepcopy(base), lora, scale)
    assert not torch.allclose(forward(base), expected, atol=1e-3)
    torch.testing.assert_close(forward(merged), expected, atol=1e-5, rtol=1e-5)


def test_low_precision_weights_merge_in_fp32_and_keep_dtype(base_and_adapted):
    base, adapted = base_and_adapted
    lora = lora_from_peft_model(adapted)
    half = copy.deepcopy(base).to(torch.bfloat16)
    w0 = half.transformer_blocks[0].attn1.to_q.weight.clone()
    merge_lora_into_transformer(half, lora, 1.0)
    a, b = lora.layers["transformer_blocks.0.attn1.to_q"]
    want = (w0.float() + 2.0 * (b @ a)).to(torch.bfloat16)  # alpha 8 / r 4
    assert half.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(half.transformer_blocks[0].attn1.to_q.weight, want)


def test_merge_refuses_foreign_or_adapted_modules(base_and_adapted):
    base, adapted = base_and_adapted
    lora = lora_from_peft_model(adapted)
    with pytest.raises(ValueError, match="already carries a peft adapter"):
        merge_lora_into_transformer(adapted, lora)
    small = PixArtTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 1})
    before = small.state_dict()["transformer_blocks.0.attn1.to_q.weight"].clone()
    with pytest.raises(ValueError, match="transformer_blocks.1.* is not in this transformer"):
        merge_lora_into_transformer(small, lora)
    assert torch.equal(small.state_dict()["transformer_blocks.0.attn1.to_q.weight"], before)  # untouched


def test_merge_lora_to_folder(tmp_path, base_and_adapted):
    base, adapted = base_and_adapted
    base.save_pretrained(tmp_path / "base" / "transformer")  # a pipeline-style folder
    lora = lora_from_peft_model(adapted)
    save_lora(tmp_path / "l.safetensors", lora, format="kohya")
    out = merge_lora_to_folder(tmp_path / "base", tmp_path / "l.safetensors", tmp_path / "merged", scale=0.5)
    expected = forward(merge_lora_into_transformer(copy.deepcopy(base), lora, 0.5))
    assert torch.equal(forward(PixArtTransformer2DModel.from_pretrained(out)), expected)
    assert not list(out.glob("*.bin"))
    with pytest.raises(FileExistsError):
        merge_lora_to_folder(tmp_path / "base", tmp_path / "l.safetensors", out)
