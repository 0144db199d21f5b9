"""Opt-in: push a tiny LoRA to the REAL Hugging Face Hub and load it back, then delete the repo.

    PIXART_TUNE_LIVE_HUB=1 HF_TOKEN=hf_... python -m pytest -m live_hub tests/test_hub_live.py

What the loopback tests cannot show: real authentication, LFS/Xet uploads of the binary files,
the Hub's own validation of the model card metadata. Uses a private, uniquely named repo in the
token owner's namespace (needs a write token) and deletes it at the end, even on failure.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from conftest import REPO, tiny_forward

pytestmark = [
    pytest.mark.live_hub,
    pytest.mark.skipif(
        os.environ.get("PIXART_TUNE_LIVE_HUB") != "1" or not os.environ.get("HF_TOKEN"),
        reason="live Hub test: set PIXART_TUNE_LIVE_HUB=1 and HF_TOKEN (a write token) to run it",
    ),
]


@pytest.fixture
def online(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest makes the suite offline by default
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # download for real, not from cache


def test_push_and_load_back_on_the_real_hub(online, tiny_base, tmp_path):
    from huggingface_hub import HfApi

    from pixart_tune import load_pipeline, train
    from pixart_tune.hub import push_to_hub

    run = tmp_path / "run"
    train(REPO / "recipes" / "tiny-lora.yaml",
          [f"output_dir={run}", f"data.cache_dir={run / 'cache'}", "train.steps=3", "data.trigger=sks"],
          show_progress=False)  # fmt: skip
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/pixart-tune-live-test-{uuid.uuid4().hex[:8]}"
    try:
        url = push_to_hub(run, repo_id, private=True, commit_message="pixart_tune live test")
        assert url.rstrip("/").endswith(repo_id)
        info = api.model_info(repo_id, files_metadata=True)
        assert info.private
        sizes = {s.rfilename: s.size for s in info.siblings}
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= set(sizes)
        assert sizes["adapter_model.safetensors"] == (run / "final" / "adapter_model.safetensors").stat().st_size
        assert info.card_data is not None and info.card_data.license == "apache-2.0", "the Hub parsed our metadata"

        hub = load_pipeline(str(tiny_base), lora=repo_id, device="cpu", dtype="fp32").transformer
        local = load_pipeline(str(tiny_base), lora=str(run / "final"), device="cpu", dtype="fp32").transformer
        assert torch.equal(tiny_forward(hub), tiny_forward(local))
    finally:
        api.delete_repo(repo_id, missing_ok=True)
