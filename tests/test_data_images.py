"""load_image: every kind of awkward input becomes upright RGB, or a BadImage with a clear reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixart_tune.data.images import BadImage, load_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """Encode a PIL image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data (cheap bomb stand-in)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_rgb_jpeg_round_trip():
    image = load_image(encode(Image.new("RGB", (120, 80), (200, 30, 40)), "JPEG", quality=95), "x.jpg")
    assert image.mode == "RGB" and image.size == (120, 80)
    assert np.allclose(np.asarray(image)[40, 60], (200, 30, 40), atol=4)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 0, 128), (0, 0, 32, 64))  # left half: half-transparent black
    pixels = np.asarray(load_image(encode(rgba, "PNG"), "a.png"))
    assert tuple(pixels[10, 50]) == (255, 255, 255)  # transparent -> white, not red
    assert np.allclose(pixels[10, 10], (127, 127, 127), atol=1)  # 50 % black over white


def test_la_is_composited_on_white():
    la = Image.new("LA", (64, 64), (0, 0))  # black, fully transparent
    la.paste((40, 255), (0, 0, 64, 32))  # top half opaque dark grey
    pixels = np.asarray(load_image(encode(la, "PNG"), "la.png"))
    assert tuple(pixels[50, 5]) == (255, 255, 255)
    assert tuple(pixels[5, 5]) == (40, 40, 40)


def test_palette_with_transparency_index():
    p = Image.new("P", (64, 64), 0)
    p.putpalette([0, 255, 0] + [0, 0, 255] + [0] * (254 * 3))  # 0 = green, 1 = blue
    p.paste(1, (0, 0, 64, 32))
    pixels = np.asarray(load_image(encode(p, "PNG", transparency=0), "p.png"))
    assert tuple(pixels[5, 5]) == (0, 0, 255)  # opaque blue kept
    assert tuple(pixels[50, 5]) == (255, 255, 255)  # transparent green -> white


def test_palette_without_transparency():
    p = Image.new("P", (64, 64), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    assert tuple(np.asarray(load_image(encode(p, "PNG"), "p.png"))[0, 0]) == (10, 20, 30)


def test_greyscale_becomes_rgb():
    pixels = np.asarray(load_image(encode(Image.new("L", (64, 64), 77), "PNG"), "l.png"))
    assert pixels.shape == (64, 64, 3) and tuple(pixels[0, 0]) == (77, 77, 77)


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.zeros((64, 64), dtype=np.uint16)
    values[:, 16:32], values[:, 32:48], values[:, 48:] = 128 * 257, 1000, 65535
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = np.asarray(load_image(data, "deep.png"))[0]
    assert [int(pixels[x, 0]) for x in (0, 20, 40, 60)] == [0, 128, 4, 255]  # PIL's convert('L') gives 255 for 1000


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((0, 0, 0, 0), (0, 0, 64, 32))  # top half: no ink = white
    pixels = np.asarray(load_image(encode(cmyk, "JPEG", quality=95), "cmyk.jpg")).astype(int)
    assert np.allclose(pixels[5, 5], (255, 255, 255), atol=6)
    assert np.allclose(pixels[50, 5], (255, 0, 0), atol=6)


def test_exif_orientation_6_is_applied():
    stored = Image.new("RGB", (160, 96), (0, 0, 255))  # stored landscape, blue
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "phone.jpg")
    assert image.size == (96, 160)  # width and height swapped
    pixels = np.asarray(image).astype(int)
    assert np.allclose(pixels[10, 85], (255, 0, 0), atol=30)  # the marker is now top-RIGHT
    assert np.allclose(pixels[10, 10], (0, 0, 255), atol=30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"a caption, not an image\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt header"),
    ],
    ids=["zero-byte", "text-named-jpg", "png-signature-then-garbage"],
)
def test_unreadable_bytes(data, reason):
    with pytest.raises(BadImage, match=reason) as info:
        load_image(data, "data/broken.jpg")
    assert "data/broken.jpg" in str(info.value)


def test_truncated_jpeg():
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        load_image(data[: len(data) // 2], "cut.jpg")


def test_corrupt_png_data():
    data = bytearray(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 10] = b"\xff" * 10  # smash the compressed pixel stream
    with pytest.raises(BadImage, match="corrupt"):
        load_image(bytes(data), "smashed.png")


def test_too_small_and_configurable():
    data = encode(Image.new("RGB", (200, 40), (9, 9, 9)), "PNG")
    with pytest.raises(BadImage, match="too small: 200x40"):
        load_image(data, "thin.png")
    assert load_image(data, "thin.png", min_side=32).size == (200, 40)


def test_pixel_limit_is_checked_from_the_header():
    # 9000 x 9000 = 81 Mpx declared; decoding would need 81 MB and fail on the missing data.
    with pytest.raises(BadImage, match=r"81.0 Mpx, above the 64 Mpx limit"):
        load_image(png_header_only(9000, 9000), "big.png")
    data = encode(Image.new("RGB", (200, 200)), "PNG")
    with pytest.raises(BadImage, match="above the 0.01 Mpx limit"):
        load_image(data, "small.png", max_pixels=10_000)


def test_pil_decompression_bomb_is_refused():
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(png_header_only(100_000, 100_000), "bomb.png")
