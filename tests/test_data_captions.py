"""Caption processing: trigger template, and the same preprocessing as PixArtAlphaPipeline."""

from __future__ import annotations

import pytest

from pixart_tune.data.captions import (
    CaptionCleaningUnavailable,
    caption_processing_id,
    process_caption,
)


def pipeline_text(text: str, clean: bool) -> str:
    """What PixArtAlphaPipeline does to a prompt before tokenizing it."""
    from diffusers import PixArtAlphaPipeline

    return object.__new__(PixArtAlphaPipeline)._text_preprocessing(text, clean_caption=clean)[0]


def cleaning_available() -> bool:
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


def test_plain_caption_is_lowercased_and_stripped_like_the_pipeline():
    for text in ["  A Photo of SKS dog \n", "Ünïcödé İstanbul", "already lower", "Tabs\tand  spaces"]:
        assert process_caption(text) == pipeline_text(text, clean=False)
    assert process_caption("  A Cat ") == "a cat"


def test_trigger_and_template():
    assert process_caption("a dog on grass", trigger="sks") == "sks, a dog on grass"
    assert process_caption("A dog", trigger="OHWX", template="{caption}, in the style of {trigger}") == (
        "a dog, in the style of ohwx"
    )
    assert process_caption("a dog", trigger=None) == process_caption("a dog", trigger="") == "a dog"
    assert process_caption("a {weird} caption", trigger="sks") == "sks, a {weird} caption"  # braces are data


@pytest.mark.parametrize("template", ["{trigger} only", "{trigger}, {caption}, {style}", "{caption} {"])
def test_bad_templates(template):
    with pytest.raises(ValueError, match="template"):
        process_caption("a dog", trigger="sks", template=template)


def test_clean_without_bs4_or_ftfy_refuses_loudly(monkeypatch):
    import diffusers.utils

    monkeypatch.setattr(diffusers.utils, "is_bs4_available", lambda: False)
    with pytest.raises(CaptionCleaningUnavailable, match="pip install beautifulsoup4 ftfy"):
        process_caption("a dog", clean=True)


@pytest.mark.skipif(not cleaning_available(), reason="beautifulsoup4 and ftfy are not installed")
def test_clean_matches_the_pipeline():
    text = "A PHOTO of a dog http://example.com/x.jpg   &amp; friends"
    cleaned = process_caption(text, clean=True)
    assert cleaned == pipeline_text(text, clean=True)
    assert "example.com" not in cleaned and cleaned.startswith("a photo of a dog")
    with pytest.raises(ValueError, match="trigger word 'tok123'"):
        process_caption("a dog", trigger="tok123", clean=True)


def test_processing_id_tracks_every_setting():
    ids = {
        caption_processing_id(None),
        caption_processing_id("sks"),
        caption_processing_id("sks", "{caption}, {trigger}"),
        caption_processing_id("ohwx"),
        caption_processing_id(None, clean=True),
    }
    assert len(ids) == 5
    assert caption_processing_id(None) == caption_processing_id("", "{caption} ignored {trigger}") == "lower"
    assert caption_processing_id(None, clean=True).startswith("clean@diffusers-")
