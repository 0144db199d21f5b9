"""LoRA formats: every export -> import -> apply gives the adapted model's output; diffusers and peft
read our files with their own loaders; missing alphas are never guessed silently."""

import copy
import json

import pytest
import torch
from conftest import tiny_forward
from diffusers import PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixart_tune.lora_formats import (
    DIFFUSERS_FILE,
    LORA_ADAPTER_METADATA_KEY,
    Lora,
    MissingAlphaError,
    apply_lora,
    kohya_name,
    load_lora,
    lora_from_peft_model,
    lora_to_peft_config,
    save_lora,
)
from pixart_tune.tiny import TINY_TRANSFORMER

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
PATTERNS = {"rank_pattern": {"^transformer_blocks.1.ff.net.2": 2}, "alpha_pattern": {"to_k": 3.0}}
BASE_ID = "PixArt-alpha/PixArt-XL-2-1024-MS"


pytestmark = pytest.mark.usefixtures("one_thread")


def forward(model, seed=1):
    return tiny_forward(model, seed)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return PixArtTransformer2DModel(**TINY_TRANSFORMER).eval()


@pytest.fixture(scope="module", params=["uniform", "patterns"])
def adapted(request, base):
    """(peft-adapted copy of base, its output); init_lora_weights=False so it differs from the base."""
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    extra = PATTERNS if request.param == "patterns" else {}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **extra), model)
    out = forward(model)
    assert not torch.allclose(out, forward(base), atol=1e-3)
    return model, out


def fresh_with(base, lora):
    return apply_lora(copy.deepcopy(base), lora)


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_export_import_apply_round_trip(tmp_path, base, adapted, fmt):
    model, expected = adapted
    lora = lora_from_peft_model(model)
    assert len(lora.layers) == 2 * 10  # 2 blocks x (attn1: 4, attn2: 4, ff: 2)
    target = tmp_path / ("lora.safetensors" if fmt == "kohya" else "out")
    written = save_lora(target, lora, format=fmt, base_model=BASE_ID)
    loaded, info = load_lora(target)
    # A diffusers file carries alpha/r folded into B (alpha = rank): same outputs, right in every loader.
    alpha, saved = (4.0, lora.with_unit_scale()) if fmt == "diffusers" else (8.0, lora)
    assert (info["format"], info["rank"], info["alpha"], info["alpha_assumed"]) == (fmt, 4, alpha, False)
    assert info["base_model"] == BASE_ID and loaded.alphas == saved.alphas
    torch.testing.assert_close(forward(fresh_with(base, loaded)), expected, atol=1e-6, rtol=0)
    assert load_lora(written)[1]["format"] == fmt  # the file itself is recognised as well as its folder


def test_diffusers_file_loads_through_diffusers_own_loader(tmp_path, base, adapted):
    class T(PixArtTransformer2DModel, PeftAdapterMixin):
        pass

    model, expected = adapted
    save_lora(tmp_path, lora_from_peft_model(model), format="diffusers")
    with safe_open(str(tmp_path / DIFFUSERS_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()[LORA_ADAPTER_METADATA_KEY])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 4  # alpha/r folded into B
    theirs = T.from_config(base.config).eval()
    theirs.load_state_dict(base.state_dict())
    theirs.load_lora_adapter(str(tmp_path), weight_name=DIFFUSERS_FILE, prefix="transformer")
    torch.testing.assert_close(forward(theirs), expected, atol=1e-6, rtol=0)


def test_peft_folder_loads_through_peft_and_back(tmp_path, base, adapted):
    model, expected = adapted
    lora = lora_from_peft_model(model)
    save_lora(tmp_path, lora, format="peft", target_modules=TARGETS)
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == sorted(TARGETS)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(forward(peft_model), expected, atol=1e-6, rtol=0)
    again = lora_from_peft_model(peft_model)  # strips PeftModel's base_model.model. prefix
    assert again.alphas == lora.alphas and all(torch.equal(again.layers[m][1], lora.layers[m][1]) for m in lora.layers)
    with pytest.raises(ValueError, match="leave out LoRA modules"):
        save_lora(tmp_path / "x", lora, format="peft", target_modules=["to_q"])


def test_official_script_file_needs_an_alpha(tmp_path, base, adapted):
    model, expected = adapted
    state = get_peft_model_state_dict(model)  # what train_pixart_lora_hf.py writes, under "unet."
    path = tmp_path / DIFFUSERS_FILE
    save_file({f"unet.base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(MissingAlphaError, match=r"no alpha.*assume_alpha=8 \(CLI: --assume-alpha 8\).*--assume-alpha 4"):
        load_lora(tmp_path)
    lora, info = load_lora(path, assume_alpha=8)
    assert (info["format"], info["alpha"], info["alpha_assumed"]) == ("official", 8.0, True)
    if lora.alphas == lora_from_peft_model(model).alphas:  # the "patterns" adapter used alpha 3 for to_k
        torch.testing.assert_close(forward(fresh_with(base, lora)), expected, atol=1e-6, rtol=0)
    as_rank, _ = load_lora(path, assume_alpha="rank")
    assert all(as_rank.alphas[m] == as_rank.rank_of(m) for m in as_rank.layers)


def test_kohya_alpha_tensor_is_honoured(tmp_path, base, adapted):
    model, _ = adapted
    path = save_lora(tmp_path / "k.safetensors", lora_from_peft_model(model), format="kohya")
    tensors = load_file(str(path))
    module = "transformer_blocks.0.ff.net.0.proj"
    assert f"{kohya_name(module)}.lora_up.weight" == "lora_transformer_transformer_blocks_0_ff_net_0_proj.lora_up.weight"
    tensors[f"{kohya_name(module)}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    lora, _ = load_lora(path)
    assert lora.alphas[module] == 2.0
    reference = copy.deepcopy(model)
    reference.get_submodule(module).scaling["default"] = 2.0 / 4
    torch.testing.assert_close(forward(fresh_with(base, lora)), forward(reference), atol=1e-6, rtol=0)
    # kohya's own rule without .alpha tensors is alpha = rank, and we say so
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, str(path))
    with pytest.warns(UserWarning, match="alpha = rank"):
        lora, info = load_lora(path)
    assert info["alpha_assumed"] and lora.alphas[module] == 4.0


def test_unsupported_keys_and_bad_kohya_names_are_named(tmp_path):
    a, b = torch.zeros(2, 48), torch.zeros(48, 2)
    save_file({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
               "transformer.proj_out.lora_magnitude_vector": torch.zeros(48)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_lora(tmp_path / "dora.safetensors")
    save_file({"lora_transformer_nope_layer.lora_down.weight": a, "lora_transformer_nope_layer.lora_up.weight": b},
              str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match="nope_layer.*module_names"):
        load_lora(tmp_path / "k.safetensors")
    with pytest.warns(UserWarning, match="alpha = rank"):
        lora, _ = load_lora(tmp_path / "k.safetensors", module_names=["nope.layer"])
    assert set(lora.layers) == {"nope.layer"}


def test_per_module_values_become_patterns():
    layers = {"transformer_blocks.0.attn1.to_q": (torch.zeros(4, 8), torch.zeros(8, 4)),
              "transformer_blocks.0.attn1.to_k": (torch.zeros(2, 8), torch.zeros(8, 2)),
              "proj_out": (torch.zeros(4, 8), torch.zeros(8, 4))}
    lora = Lora(layers, {"transformer_blocks.0.attn1.to_q": 8.0, "transformer_blocks.0.attn1.to_k": 8.0, "proj_out": 1.0})
    config = lora_to_peft_config(lora)
    assert (config.r, config.lora_alpha) == (4, 8.0)
    assert config.rank_pattern == {"^transformer_blocks.0.attn1.to_k": 2} and config.alpha_pattern == {"^proj_out": 1.0}
    with pytest.raises(ValueError, match="disagree on the rank"):
        Lora({"x": (torch.zeros(4, 8), torch.zeros(8, 2))}, {"x": 1.0})


def test_diffusers_file_is_right_even_where_alpha_is_ignored(tmp_path):
    """ComfyUI and diffusers given a bare file path apply B @ A at scale 1: the file must not need alpha."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    layers = {"transformer_blocks.0.attn1.to_q": (torch.randn(4, 48), torch.randn(48, 4))}
    lora = Lora(layers, {"transformer_blocks.0.attn1.to_q": 8.0})  # scale 2
    path = save_lora(tmp_path / "x.safetensors", lora, format="diffusers")
    raw = load_file(str(path))
    a, b = raw["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"], raw["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    torch.testing.assert_close(b @ a, 2.0 * layers["transformer_blocks.0.attn1.to_q"][1] @ layers["transformer_blocks.0.attn1.to_q"][0])
    again, info = load_lora(path)
    assert info["alpha"] == info["rank"] == 4
    torch.testing.assert_close(again.scale_of("transformer_blocks.0.attn1.to_q") * again.layers["transformer_blocks.0.attn1.to_q"][1],
                               2.0 * layers["transformer_blocks.0.attn1.to_q"][1])  # fmt: skip
