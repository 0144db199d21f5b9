"""Decode image bytes into an upright 8-bit RGB PIL image, or raise BadImage with the reason.

Rules (also in data/README.md):
  - EXIF orientation is applied, so a phone photo stored sideways comes out the way it is viewed.
  - Transparency (RGBA, LA, PA, palette or single-colour transparency) is composited on WHITE:
    transparent regions of product shots, logos and cut-outs are meant to sit on a light page, and
    dropping alpha would instead expose whatever colour the encoder left in those pixels.
  - 16-bit greyscale is scaled to 8 bits (value / 257), not clipped at 255 as PIL's convert() does.
  - CMYK goes through its embedded ICC profile when there is one (PIL's plain formula otherwise).
    ICC profiles of RGB images are ignored: pixels are taken as sRGB, as most trainers do.
  - Animated GIF/WebP: the first frame.
  - Refused: empty, truncated, corrupt or non-image data; images above `max_pixels` (decided from
    the header, before decoding: decompression-bomb guard); images whose short side is under
    `min_side` pixels (too little detail to learn from once upscaled to a 256-1024 px bucket).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 Mpx; PIL's own bomb error (about 179 Mpx) still applies above
DEFAULT_MIN_SIDE = 64
BACKGROUND = (255, 255, 255)  # what transparent pixels become
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class BadImage(ValueError):
    """Image bytes that cannot become a training image; `reason` says why."""

    def __init__(self, reason: str, origin: str = ""):
        self.reason = reason
        self.origin = origin
        super().__init__(f"{origin}: {reason}" if origin else reason)


def load_image(
    data: bytes,
    origin: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Decode encoded bytes into an upright RGB image (alpha on white), or raise BadImage."""
    if not data:
        raise BadImage("empty file (0 bytes)", origin)
    image = _open_within_limits(data, origin, max_pixels, min_side)
    _decode(image, origin)
    return _to_rgb(_upright(image), origin)


def _open_within_limits(data: bytes, origin: str, max_pixels: int, min_side: int) -> Image.Image:
    """Read only the header, then refuse sizes we will not decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 Mpx; we apply our own limit right below, so its warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"refused as a possible decompression bomb: {e}", origin) from None
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read (unknown format or corrupt header)", origin) from None
    except Exception as e:  # noqa: BLE001 -- PIL plugins raise many exception types for malformed headers
        raise BadImage(f"truncated or corrupt header, cannot open ({type(e).__name__}: {e})", origin) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(
            f"{width}x{height} is {width * height / 1e6:.1f} Mpx, above the {max_pixels / 1e6:g} Mpx limit "
            "(decompression-bomb guard); downscale the image or raise the limit",
            origin,
        )
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}x{height}, the short side is under {min_side} px", origin)
    return image


def _decode(image: Image.Image, origin: str) -> None:
    """Decode the pixels now, so truncated or corrupt data fails here and not later."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as e:  # noqa: BLE001 -- truncation: OSError; broken streams: SyntaxError, ValueError, ...
        raise BadImage(f"truncated or corrupt image data ({type(e).__name__}: {e})", origin) from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not cost the image; orientation unknown
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image, origin: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, following the rules in the module docstring."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _on_background(image)
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:  # e.g. LAB: no direct conversion in PIL
        raise BadImage(f"unsupported colour mode {image.mode} ({e})", origin) from None


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L', scaled over the full range, not clipped."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images are either 0..1 (scientific / HDR exports) or already 0..255.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        # 'I;16*' is 0..65535; 'I' (32-bit) is read as 16-bit data too, which is what PIL used to
        # return for 16-bit PNGs. 65535 / 257 = 255 exactly.
        scale = 1.0 / 257.0
    eight_bit = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit)  # 2-D uint8 -> mode "L"


def _on_background(image: Image.Image) -> Image.Image:
    """Composite over an opaque white background (see the module docstring for why white)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when present; PIL's formula otherwise."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion rather than lose the image
    return image.convert("RGB")
