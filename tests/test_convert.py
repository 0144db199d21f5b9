"""Original PixArt checkpoint <-> diffusers conversion: exact round trips and equal outputs."""

import json
import pickle

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file

from pixart_tune.convert import (
    EXTRAS_FILE,
    CheckpointRefused,
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    diffusers_to_original,
    infer_config,
    load_original_checkpoint,
    original_to_diffusers,
)
from pixart_tune.tiny import TINY_TRANSFORMER

STYLES = {"1024": TINY_TRANSFORMER, "512": {**TINY_TRANSFORMER, "sample_size": 64}}
TINY_HEADS = {"num_attention_heads": 3, "attention_head_dim": 16}  # a head count is not in the weights


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(style="1024", seed=0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**STYLES[style]).eval()


def forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    micro = model.config.sample_size == 128
    cond = {"resolution": torch.tensor([[128.0, 128.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 4, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
            timestep=torch.tensor([10, 700]),
            encoder_attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
            added_cond_kwargs=cond if micro else {"resolution": None, "aspect_ratio": None},
        ).sample


def original_sd(model):
    """What the original code would save: original keys plus pos_embed and a null caption."""
    extra = {"pos_embed": model.pos_embed.pos_embed.clone(), "y_embedder.y_embedding": torch.randn(120, 32)}
    return diffusers_to_original(model.state_dict(), extra=extra)


@pytest.mark.parametrize("style", ["1024", "512"])
def test_round_trip_is_exact(style):
    sd = tiny(style).state_dict()
    orig = diffusers_to_original(sd)
    assert "blocks.1.attn.qkv.weight" in orig and orig["blocks.1.attn.qkv.weight"].shape == (144, 48)
    assert ("csize_embedder.mlp.0.weight" in orig) == (style == "1024")
    back = original_to_diffusers(orig, num_layers=2)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_dropped_tensors_are_handed_back_and_restored():
    orig = original_sd(tiny())
    dropped = {}
    sd = original_to_diffusers(orig, dropped=dropped)
    assert set(dropped) == {"pos_embed", "y_embedder.y_embedding"}
    again = diffusers_to_original(sd, extra=dropped)
    assert again.keys() == orig.keys() and all(torch.equal(again[k], orig[k]) for k in orig)


def test_strict_key_errors_list_the_keys():
    orig = diffusers_to_original(tiny().state_dict())
    orig["blocks.0.attn.extra.weight"] = torch.zeros(1)
    del orig["t_block.1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['t_block.1.bias'\].*blocks.0.attn.extra.weight"):
        original_to_diffusers(orig)


@pytest.mark.parametrize("style", ["1024", "512"])
def test_pth_converts_to_a_model_with_the_same_output(tmp_path, style):
    model, ema = tiny(style, seed=0), tiny(style, seed=5)
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": original_sd(model), "state_dict_ema": original_sd(ema), "step": 10}, pth)
    for use_ema, source in ((False, model), (True, ema)):
        out = convert_original_to_diffusers(pth, tmp_path / f"out-{use_ema}", config=TINY_HEADS, use_ema=use_ema)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", EXTRAS_FILE]
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["sample_size"] == STYLES[style]["sample_size"] and cfg["num_layers"] == 2  # inferred
        converted = PixArtTransformer2DModel.from_pretrained(out).eval()
        assert torch.equal(forward(converted), forward(source))


def test_diffusers_folder_back_to_original_safetensors(tmp_path):
    model = tiny()
    orig = original_sd(model)
    torch.save({"state_dict": orig}, tmp_path / "a.pth")
    folder = convert_original_to_diffusers(tmp_path / "a.pth", tmp_path / "diffusers", config=TINY_HEADS)
    back = load_file(convert_diffusers_to_original(folder, tmp_path / "b.safetensors"))
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    # Without the extras sidecar: pos_embed comes from diffusers' own sin-cos table, no null caption.
    (folder / EXTRAS_FILE).unlink()
    with pytest.warns(UserWarning, match="y_embedding"):
        bare = load_file(convert_diffusers_to_original(folder, tmp_path / "c.safetensors"))
    assert torch.equal(bare["pos_embed"], orig["pos_embed"]) and "y_embedder.y_embedding" not in bare
    # The original-layout .safetensors converts again (sizes from csize_embedder / pos_embed).
    again = convert_original_to_diffusers(tmp_path / "c.safetensors", tmp_path / "again", config=TINY_HEADS)
    assert torch.equal(forward(PixArtTransformer2DModel.from_pretrained(again)), forward(model))
    with pytest.raises(ValueError, match="only .safetensors"):
        convert_diffusers_to_original(folder, tmp_path / "d.pth")
    with pytest.raises(FileExistsError):
        convert_original_to_diffusers(tmp_path / "a.pth", folder, config=TINY_HEADS)


class Payload:  # any class: weights_only unpickling must refuse it
    def __reduce__(self):
        return (print, ("this would have run",))


def test_pickle_with_arbitrary_object_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": diffusers_to_original(tiny().state_dict()), "args": Payload()}, path)
    with pytest.raises(CheckpointRefused, match="Refused to load .*arbitrary code"):
        load_original_checkpoint(path)
    assert "would have run" not in capsys.readouterr().out
    assert issubclass(CheckpointRefused, ValueError) and not issubclass(CheckpointRefused, pickle.UnpicklingError)


def test_unwrap_rules(tmp_path):
    orig = diffusers_to_original(tiny("512").state_dict())
    torch.save({"state_dict_ema": orig}, tmp_path / "ema.pth")
    with pytest.raises(ValueError, match="use_ema=True"):
        load_original_checkpoint(tmp_path / "ema.pth")
    torch.save({f"module.{k}": v for k, v in orig.items()}, tmp_path / "ddp.pth")
    assert load_original_checkpoint(tmp_path / "ddp.pth").keys() == orig.keys()


def test_infer_config_presets_and_xl_heads():
    orig = diffusers_to_original(tiny("512").state_dict())
    with pytest.raises(ValueError, match="config='512'"):
        infer_config(orig)  # no pos_embed, no csize_embedder: resolution unknown
    assert infer_config(orig, {**TINY_HEADS, "sample_size": 32})["sample_size"] == 32
    with pytest.raises(ValueError, match="num_attention_heads"):
        infer_config(orig, "512")  # width 48 is no multiple of PixArt-XL's head dim 72
    xl = {**orig, "x_embedder.proj.weight": torch.zeros(1152, 4, 2, 2)}
    assert infer_config(xl, "256")["num_attention_heads"] == 16


def test_stored_pos_embed_gives_sample_size_and_interpolation_scale():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**TINY_TRANSFORMER, "sample_size": 32, "interpolation_scale": 0.5})
    cfg = infer_config(original_sd(model), TINY_HEADS)
    assert (cfg["sample_size"], cfg["interpolation_scale"]) == (32, 0.5)  # diffusers' default would be 1
    assert infer_config(original_sd(tiny("512")), TINY_HEADS)["interpolation_scale"] is None  # the default fits
