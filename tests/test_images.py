"""assistant.images: every image is generated here with Pillow; hostile inputs are crafted bytes."""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from io import BytesIO

import pytest
from PIL import Image

from assistant import images
from assistant.errors import BudgetExceeded, ImageRejected
from assistant.images import ImageLimits, check_image_count, decode_stored, load_image, parse_image_url, to_data_url

PARAM = "item.content[1].image_url"
LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def noise(size: tuple[int, int]) -> Image.Image:
    """Incompressible pixels, so that cutting the file cuts pixel data."""
    return Image.frombytes("RGB", size, bytes((i * 7919 + i // 3) % 251 for i in range(size[0] * size[1] * 3)))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``: no pixel data to match."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    # signature (8) | length (4) | b"IHDR" (4) | width, height, ... (13) | crc (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def rejected(code: str, call, *args, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value.message
    assert info.value.param == PARAM
    assert info.value.message
    return info.value


# ------------------------------------------------------------------ accepted images


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_stills_are_accepted_as_rgb_and_stored_as_sent(fmt: str, mime: str) -> None:
    data = encode(Image.new("RGB", (64, 32), (10, 200, 30)), fmt)
    stored, rgb = load_image(data, LIMITS, param=PARAM)
    assert (rgb.mode, rgb.size) == ("RGB", (64, 32))
    assert (stored.width, stored.height, stored.mime_type) == (64, 32, mime)
    assert stored.data == data
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert decode_stored(stored.data).size == (64, 32)


def test_declared_mime_is_ignored_in_favour_of_the_content() -> None:
    data = encode(Image.new("RGB", (8, 8)), "JPEG")
    mime, raw = parse_image_url(data_url(data, "image/png"), LIMITS, param=PARAM)
    assert (mime, raw) == ("image/png", data)
    assert load_image(raw, LIMITS, param=PARAM)[0].mime_type == "image/jpeg"


def test_rgba_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    stored, rgb = load_image(encode(image, "PNG"), LIMITS, param=PARAM)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((3, 3)) == (255, 255, 255)
    assert decode_stored(stored.data).getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_swaps_width_and_height() -> None:
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue left strip; orientation 6 rotates it to the top
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif)
    stored, rgb = load_image(data, LIMITS, param=PARAM)
    assert rgb.size == (20, 40)
    assert (stored.width, stored.height) == (20, 40)
    assert stored.data == data  # stored as sent; orientation is applied on decode
    decoded = decode_stored(stored.data)
    assert decoded.size == (20, 40)
    red, green, blue = decoded.getpixel((10, 2))
    assert blue > 200 and red < 60


def test_gif_takes_the_first_frame_and_is_stored_as_png() -> None:
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    stored, rgb = load_image(data, LIMITS, param=PARAM)
    assert (rgb.mode, rgb.size, rgb.getpixel((5, 5))) == ("RGB", (16, 12), (255, 0, 0))
    assert stored.mime_type == "image/png"
    assert stored.sha256 == hashlib.sha256(stored.data).hexdigest()
    assert decode_stored(stored.data).getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_webp_and_png_take_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    stored, rgb = load_image(data, LIMITS, param=PARAM)
    assert rgb.getpixel((5, 5)) == (0, 255, 0)
    assert (stored.mime_type, stored.data == data) == ("image/png", False)
    assert decode_stored(stored.data).getpixel((5, 5)) == (0, 255, 0)


def test_multi_picture_jpeg_from_a_camera_is_stored_as_sent() -> None:
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    stored, rgb = load_image(data, LIMITS, param=PARAM)
    assert (stored.mime_type, stored.data == data) == ("image/jpeg", True)
    assert rgb.getpixel((5, 5))[0] > 200


def test_an_extra_allowed_format_is_stored_as_png() -> None:
    limits = ImageLimits(allowed_formats=("PNG", "BMP"))
    stored, rgb = load_image(encode(Image.new("RGB", (5, 3), "white"), "BMP"), limits, param=PARAM)
    assert (stored.mime_type, rgb.size) == ("image/png", (5, 3))
    assert decode_stored(stored.data).size == (5, 3)


def test_same_bytes_give_the_same_sha256() -> None:
    data = encode(noise((16, 16)), "PNG")
    assert load_image(data, LIMITS, param=PARAM)[0].sha256 == load_image(bytes(data), LIMITS, param=PARAM)[0].sha256
    other = encode(Image.new("RGB", (16, 16)), "PNG")
    assert load_image(other, LIMITS, param=PARAM)[0].sha256 != load_image(data, LIMITS, param=PARAM)[0].sha256


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_to_data_url_round_trips_to_the_same_image(fmt: str) -> None:
    stored, _ = load_image(encode(noise((12, 9)), fmt), LIMITS, param=PARAM)
    mime, data = parse_image_url(to_data_url(stored), LIMITS, param=PARAM)
    again, _ = load_image(data, LIMITS, param=PARAM)
    assert mime == stored.mime_type
    assert again == stored


def test_data_url_parameters_and_case_are_tolerated() -> None:
    data = encode(Image.new("RGB", (2, 2)), "PNG")
    url = f"DATA:Image/PNG;name=cat.png;BASE64,{base64.b64encode(data).decode()}"
    assert parse_image_url(url, LIMITS, param=PARAM) == ("image/png", data)


# ------------------------------------------------------------------ refused URLs


@pytest.mark.parametrize("url", [None, 42, {"url": "data:image/png;base64,AA=="}, b"data:image/png;base64,AA=="])
def test_non_string_url(url: object) -> None:
    rejected("image_invalid_url", parse_image_url, url, LIMITS, param=PARAM)


@pytest.mark.parametrize("url", ["", "ftp://example.com/cat.png", "file:///etc/passwd", "data:image/png;base64",
                                 "data:image/png," + "A" * 8, "image/png;base64,AAAA", "data" + "x" * 300 + ",AAAA"])
def test_malformed_or_foreign_scheme_url(url: str) -> None:
    rejected("image_invalid_url", parse_image_url, url, LIMITS, param=PARAM)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_url_is_refused(url: str) -> None:
    error = rejected("image_remote_url_refused", parse_image_url, url, LIMITS, param=PARAM)
    assert "data:image/" in error.message


@pytest.mark.parametrize("payload", ["not base64!", "AAA", "AA AA", "AAAA\nAAAA", "é" * 4])
def test_payload_that_is_not_strict_base64(payload: str) -> None:
    rejected("image_invalid_base64", parse_image_url, f"data:image/png;base64,{payload}", LIMITS, param=PARAM)


@pytest.mark.parametrize("mime", ["image/svg+xml", "text/plain", "application/pdf", ""])
def test_declared_non_raster_type(mime: str) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    rejected("image_unsupported_format", parse_image_url, data_url(svg, mime), LIMITS, param=PARAM)


def test_too_large_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("an oversized payload was decoded")

    monkeypatch.setattr(images.base64, "b64decode", must_not_decode)
    url = "data:image/png;base64," + "A" * (40 * 1024 * 1024)  # would decode to 30 MiB
    error = rejected("image_too_large", parse_image_url, url, LIMITS, param=PARAM)
    assert str(LIMITS.max_bytes) in error.message


def test_too_large_bytes_given_directly() -> None:
    data = encode(noise((64, 64)), "PNG")
    rejected("image_too_large", load_image, data, ImageLimits(max_bytes=len(data) - 1), param=PARAM)
    assert load_image(data, ImageLimits(max_bytes=len(data)), param=PARAM)[1].size == (64, 64)


# ------------------------------------------------------------------ refused files


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_format_outside_the_allowlist(fmt: str, name: str) -> None:
    error = rejected("image_unsupported_format", load_image, encode(Image.new("RGB", (8, 8)), fmt), LIMITS,
                     param=PARAM)
    assert name in error.message and "PNG" in error.message


def test_allowlist_is_per_call() -> None:
    data = encode(Image.new("RGB", (8, 8)), "GIF")
    rejected("image_unsupported_format", load_image, data, ImageLimits(allowed_formats=("PNG",)), param=PARAM)


@pytest.mark.parametrize("data", [b"just some text\n", b"%PDF-1.7\n%...",
                                  b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'])
def test_text_and_documents_are_not_images(data: bytes) -> None:
    rejected("image_unsupported_format", load_image, data, LIMITS, param=PARAM)


def test_svg_sniffed_behind_a_raster_mime() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    _, data = parse_image_url(data_url(svg, "image/png"), LIMITS, param=PARAM)
    error = rejected("image_unsupported_format", load_image, data, LIMITS, param=PARAM)
    assert "SVG" in error.message


def test_empty_and_broken_headers_are_invalid() -> None:
    rejected("image_invalid", load_image, b"", LIMITS, param=PARAM)
    rejected("image_invalid", load_image, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, LIMITS, param=PARAM)
    rejected("image_invalid", load_image, b"\xff\xd8\xff" + b"\x00" * 40, LIMITS, param=PARAM)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt: str) -> None:
    data = encode(noise((128, 128)), fmt)
    rejected("image_truncated", load_image, data[: len(data) // 2], LIMITS, param=PARAM)


@pytest.mark.parametrize(("width", "height"), [(50_000, 50_000), (9000, 10), (6001, 6000)])
def test_too_many_pixels_is_read_from_the_header(width: int, height: int) -> None:
    # The file holds no pixel data: decoding it would answer image_truncated instead.
    error = rejected("image_too_many_pixels", load_image, png_claiming(width, height), LIMITS, param=PARAM)
    assert str(LIMITS.max_pixels) in error.message


def test_a_real_compressed_bomb_is_refused_unseen() -> None:
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")
    assert len(bomb) < 100_000  # 64 million pixels, 192 MB as RGB, in a small file
    error = rejected("image_too_many_pixels", load_image, bomb, LIMITS, param=PARAM)
    assert "8000x8000" in error.message


@pytest.mark.parametrize("side", [10_000, 20_000])  # past Pillow's warning, past its error threshold
def test_pillow_bomb_guard_holds_even_when_our_limits_are_lax(side: int) -> None:
    lax = ImageLimits(max_pixels=10**12, max_side=10**6)
    rejected("image_too_many_pixels", load_image, png_claiming(side, side), lax, param=PARAM)


# ------------------------------------------------------------------ budgets


def test_image_count_per_message() -> None:
    check_image_count(8, LIMITS, param="item.content")
    with pytest.raises(BudgetExceeded) as info:
        check_image_count(9, LIMITS, param="item.content")
    assert (info.value.code, info.value.param) == ("too_many_images", "item.content")
    assert "8" in info.value.message
