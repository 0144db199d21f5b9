"""Caption text processing: trigger word template, then the exact text preprocessing of the pipeline.

The text T5 sees during training must equal the text it sees at inference. `PixArtAlphaPipeline`
always preprocesses prompts (`_text_preprocessing`): with `clean_caption=False` it lowercases and
strips; with `clean_caption=True` it runs `_clean_caption` twice (needs beautifulsoup4 + ftfy, and
silently skips cleaning when they are missing). We apply the same preprocessing to training captions,
and refuse `clean=True` loudly when the cleaning packages are missing.
"""

from __future__ import annotations

import functools

DEFAULT_TEMPLATE = "{trigger}, {caption}"


class CaptionCleaningUnavailable(ImportError):
    """clean=True was asked for, but beautifulsoup4 or ftfy is not installed."""


def process_caption(
    caption: str,
    *,
    trigger: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    clean: bool = False,
) -> str:
    """The text to encode with T5 for `caption`: trigger template, then the pipeline's preprocessing."""
    text = caption.strip()
    if trigger:
        text = apply_template(template, trigger, text)
    if clean:
        if trigger:
            _check_trigger_survives_cleaning(trigger.strip())
        return _pipeline_preprocessing(text, clean=True)
    # Same as the pipeline's clean_caption=False branch; done here to avoid importing the pipeline
    # module (seconds) for one string method. tests/test_data_captions.py checks they agree.
    return text.lower().strip()


def apply_template(template: str, trigger: str, caption: str) -> str:
    """Put the trigger word and the caption into the template, e.g. '{trigger}, {caption}'."""
    _check_template(template)
    return template.format(trigger=trigger.strip(), caption=caption).strip()


def caption_processing_id(trigger: str | None, template: str = DEFAULT_TEMPLATE, clean: bool = False) -> str:
    """A short, readable description of the caption settings, to record with cached text features."""
    if clean:
        # Cleaning is a pile of regexes inside diffusers: a new diffusers version may clean differently.
        import diffusers

        parts = [f"clean@diffusers-{diffusers.__version__}"]
    else:
        parts = ["lower"]
    if trigger:
        _check_template(template)
        parts.append(f"trigger={trigger.strip()!r}")
        parts.append(f"template={template!r}")
    return ";".join(parts)


def _check_template(template: str) -> None:
    """A template must place the caption, and name no fields other than trigger and caption."""
    if "{caption}" not in template:
        raise ValueError(f"caption template {template!r} must contain '{{caption}}' (e.g. '{DEFAULT_TEMPLATE}')")
    try:
        template.format(trigger="", caption="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"caption template {template!r} is not valid: only '{{trigger}}' and '{{caption}}' may appear ({e})"
        ) from None


@functools.cache
def _check_trigger_survives_cleaning(trigger: str) -> None:
    """Cleaning deletes some tokens (e.g. 'tok123', URLs); a deleted trigger would train nothing."""
    cleaned = _pipeline_preprocessing(trigger, clean=True)
    if cleaned != trigger.lower():
        raise ValueError(
            f"caption cleaning turns the trigger word {trigger!r} into {cleaned!r}; "
            "choose a trigger of plain letters (e.g. 'sks'), or set data.clean_caption=false"
        )


def _pipeline_preprocessing(text: str, clean: bool) -> str:
    """Run PixArtAlphaPipeline._text_preprocessing itself, after making sure cleaning can really run."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    missing = [name for name, ok in (("beautifulsoup4", is_bs4_available()), ("ftfy", is_ftfy_available())) if not ok]
    if clean and missing:
        raise CaptionCleaningUnavailable(
            f"clean_caption needs {' and '.join(missing)}, which is not installed. "
            "Run: pip install beautifulsoup4 ftfy  (the [captions] extra of pixart_tune; or set data.clean_caption=false). "
            "Without them the diffusers pipeline silently skips cleaning, so we refuse rather than guess."
        )
    return _text_preprocessor()._text_preprocessing(text, clean_caption=clean)[0]


@functools.cache
def _text_preprocessor():
    """A bare PixArtAlphaPipeline object, only to call its text methods (they use no model)."""
    from diffusers import PixArtAlphaPipeline

    # object.__new__ skips __init__: no transformer, VAE or T5 is needed or loaded.
    return object.__new__(PixArtAlphaPipeline)
