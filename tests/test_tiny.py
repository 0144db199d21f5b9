"""The embedded tiny PixArt: Hub layout, deterministic, real tokenizer, 1024-MS behaviour."""

import json

import torch

from pixart_tune.tiny import build_tiny_pipeline, write_tiny_pipeline


def test_hub_layout(tiny_base):
    index = json.loads((tiny_base / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (tiny_base / part).is_dir()
    assert (tiny_base / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_base / "text_encoder" / "model.safetensors").is_file()
    assert (tiny_base / "tokenizer" / "spiece.model").is_file()
    sched = json.loads((tiny_base / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["beta_schedule"] == "linear"
    tcfg = json.loads((tiny_base / "transformer" / "config.json").read_text())
    assert tcfg["sample_size"] == 128 and tcfg["out_channels"] == 8 and tcfg["norm_type"] == "ada_norm_single"


def test_deterministic_from_seed(tmp_path):
    a, b = build_tiny_pipeline(0), build_tiny_pipeline(0)
    c = build_tiny_pipeline(1)
    for (name, pa), (_, pb) in zip(
        a.transformer.state_dict().items(), b.transformer.state_dict().items()
    ):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.transformer.parameters(), c.transformer.parameters()))


def test_tokenizer_round_trips_captions(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    for text in ("a photo of a cat", "a rocket launch at night, bright fire and smoke"):
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids, "every word maps to real pieces, not <unk>"
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_micro_conditions_and_binning_are_active(tiny_base):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_base)
    assert pipe.transformer.use_additional_conditions  # 1024-MS behaviour from sample_size 128
    image = pipe("a photo of a cat", height=300, width=200, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (200, 300)  # binned to a 1024 bucket, then resized back


def test_refuses_to_overwrite(tmp_path, tiny_base):
    import pytest

    with pytest.raises(FileExistsError):
        write_tiny_pipeline(tiny_base)
