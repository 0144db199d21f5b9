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
