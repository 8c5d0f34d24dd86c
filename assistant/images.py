"""Image input: bytes in, a validated RGB image out. No sockets, no torch, no database.

A client sends an image as ``data:<mime>;base64,<payload>``. :func:`parse_image_url`
turns that into raw bytes, :func:`load_image` validates and decodes them into the
:class:`~assistant.items.StoredImage` the store keeps plus the RGB picture, and
:func:`decode_stored` re-opens stored bytes for the engine.

Every bound is checked as early as it can be, so hostile input costs little:

- the base64 payload's length is checked before it is decoded (``max_bytes``);
- the file format is restricted with Pillow's ``formats=`` allowlist, so no other
  decoder ever parses client bytes (SVG is refused: a document, not pixels);
- width and height come from the file header and are checked against ``max_side``
  and ``max_pixels`` before any pixel data is decoded; Pillow's decompression-bomb
  guard is turned into an error for the duration of the call (without touching its
  process-wide setting);
- animated GIF / WebP / PNG yield their first frame only.

What is stored (``StoredImage.data``):

- PNG, JPEG and WebP stills keep the bytes exactly as sent. EXIF orientation is
  not baked in: ``width``/``height`` are reported after orientation and
  :func:`decode_stored` applies it on every decode, as browsers do for the same
  bytes in a data URL. Re-encoding would turn a typical 3 MB portrait phone photo
  into a 20 MB PNG, and cost a second of CPU, for nothing;
- anything else (a GIF, an animation, an allowed format outside those three) is
  stored as a PNG of its first frame, flattened to RGB.

``mime_type`` is that of the stored bytes, sniffed from the content, never the
declared one. ``sha256`` is the hash of the stored bytes: what the store keeps
once per hash, and what conversations refer to.

Error codes (all :class:`~assistant.errors.ImageRejected` unless noted), each
with the ``param`` the caller passes (e.g. ``item.content[1].image_url``):

========================== ==========================================================
code                       meaning
========================== ==========================================================
image_invalid_url          not a string, or not ``data:image/<type>;base64,<payload>``
image_remote_url_refused   an ``http(s)://`` URL: this server fetches nothing
image_invalid_base64       the payload is not strict base64
image_too_large            the file exceeds ``max_bytes`` (checked before decoding)
image_unsupported_format   declared or sniffed type is not an allowed raster format
image_invalid              the format is allowed but its header cannot be read
image_too_many_pixels      ``max_side`` / ``max_pixels`` exceeded, or a decompression bomb
image_truncated            the header was fine but the pixel data is cut or corrupt
too_many_images            :class:`~assistant.errors.BudgetExceeded`: more than
                           ``max_images_per_message`` images in one message
========================== ==========================================================
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import warnings
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageOps

from assistant.errors import BudgetExceeded, ImageRejected, quote
from assistant.items import StoredImage

# Formats whose bytes are stored as sent; MPO is how Pillow names a multi-picture
# JPEG (most phone cameras): its bytes are a valid JPEG whose first picture is the photo.
_STORED_AS_SENT: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg",
                                   "WEBP": "image/webp"}
_STORED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
_EXAMPLE_URL = "data:image/png;base64,<payload>"
# Longest "data:<mime>;<params>" head we read; the payload after the comma is never scanned by a regex.
_MAX_HEAD_CHARS = 256
_HEAD = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*)", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image and on images per message; built once from the Config."""

    max_bytes: int = 10 * 1024 * 1024  # file bytes, after base64 decoding
    max_pixels: int = 36_000_000  # width * height, read from the header before decoding
    max_side: int = 8192
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")
    max_images_per_message: int = 8


def check_image_count(num_images: int, limits: ImageLimits, *, param: str) -> None:
    """Refuse a message carrying more than ``max_images_per_message`` images."""
    if num_images > limits.max_images_per_message:
        raise BudgetExceeded(f"This message carries {num_images} images; at most {limits.max_images_per_message} "
                             "are accepted per message.", param=param, code="too_many_images")


def parse_image_url(url: object, limits: ImageLimits, *, param: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<payload>`` → (declared mime, file bytes). Nothing is decoded as an image."""
    if not isinstance(url, str):
        raise ImageRejected(f"Expected image_url to be a string like {_EXAMPLE_URL}, got {type(url).__name__}.",
                            param=param, code="image_invalid_url")
    if url[:8].lower().startswith(("http://", "https://")):
        raise ImageRejected("Remote image URLs are not fetched: this server makes no outbound requests; "
                            f"send the image inline as {_EXAMPLE_URL}.",
                            param=param, code="image_remote_url_refused")
    comma = url.find(",", 0, _MAX_HEAD_CHARS)
    head = _HEAD.fullmatch(url, 0, comma) if comma >= 0 else None
    if head is None:
        raise ImageRejected(f"Expected a data URL like {_EXAMPLE_URL}.", param=param, code="image_invalid_url")
    params = [p.strip().lower() for p in head["params"].split(";")[1:]]
    if "base64" not in params:
        raise ImageRejected(f"Expected a base64 data URL like {_EXAMPLE_URL} (the ';base64' marker is missing).",
                            param=param, code="image_invalid_url")
    mime = head["mime"].strip().lower()
    if not mime.startswith("image/") or mime == "image/svg+xml":
        raise ImageRejected(f"The data URL declares {quote(mime) or 'no media type'!r}; expected a raster image, "
                            f"one of {_format_list(limits)}.", param=param, code="image_unsupported_format")
    # Refuse by length first, so an oversized payload is never copied nor decoded.
    num_chars = len(url) - comma - 1
    num_bytes = num_chars * 3 // 4 - (2 if url.endswith("==") else 1 if url.endswith("=") else 0)
    if num_bytes > limits.max_bytes:
        raise ImageRejected(_too_large_message(num_bytes, limits), param=param, code="image_too_large")
    try:
        data = base64.b64decode(url[comma + 1:], validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("The image payload is not valid base64 (standard alphabet, '=' padding, "
                            "no whitespace).", param=param, code="image_invalid_base64") from None
    return mime, data


def load_image(data: bytes, limits: ImageLimits, *, param: str) -> tuple[StoredImage, Image.Image]:
    """Validate file bytes; return what to store and the decoded RGB picture (orientation applied)."""
    if len(data) > limits.max_bytes:
        raise ImageRejected(_too_large_message(len(data), limits), param=param, code="image_too_large")
    if not data:
        raise ImageRejected(f"The image is empty; expected a file in one of {_format_list(limits)}.", param=param,
                            code="image_invalid")
    with warnings.catch_warnings():
        # Pillow's bomb guard is process-wide and only warns below 2x its limit: make it an error, here only.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, limits, param=param)
        width, height = image.size
        if max(width, height) > limits.max_side or width * height > limits.max_pixels:
            raise ImageRejected(_too_many_pixels_message(width, height, limits), param=param,
                                code="image_too_many_pixels")
        try:
            image.load()  # the first frame only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(_too_many_pixels_message(width, height, limits), param=param,
                                code="image_too_many_pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise ImageRejected(f"The {image.format} image is truncated or corrupt: its pixel data cannot be "
                                "decoded.", param=param, code="image_truncated") from None
    rgb = _to_rgb(ImageOps.exif_transpose(image))
    # PNG and WebP know their frame count from the header; GIF (which would seek) is never asked.
    is_still = image.format == "MPO" or not getattr(image, "is_animated", False)
    if image.format in _STORED_AS_SENT and is_still:
        mime, stored = _STORED_AS_SENT[image.format], data
    else:
        mime, stored = "image/png", _encode_png(rgb)
    record = StoredImage(sha256=hashlib.sha256(stored).hexdigest(), mime_type=mime,
                         width=rgb.width, height=rgb.height, data=stored)
    return record, rgb


def decode_stored(data: bytes) -> Image.Image:
    """Re-open stored bytes (validated by :func:`load_image`) as RGB, EXIF orientation applied."""
    opened = Image.open(BytesIO(data), formats=_STORED_FORMATS)
    opened.load()
    return _to_rgb(ImageOps.exif_transpose(opened))


def to_data_url(image: StoredImage) -> str:
    """The stored bytes as a ``data:`` URL, accepted back by :func:`parse_image_url`."""
    return f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}"


def _open(data: bytes, limits: ImageLimits, *, param: str) -> Image.Image:
    """Read the header with only the allowed decoders; nothing past the header is decoded."""
    try:
        return Image.open(BytesIO(data), formats=limits.allowed_formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"The image header declares more pixels than this server decodes; at most "
                            f"{limits.max_pixels} pixels are accepted.", param=param,
                            code="image_too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        pass  # Pillow says only "cannot identify": sniff below to say whether the format or the file is wrong
    sniffed = _sniff_format(data)
    if sniffed in limits.allowed_formats:
        raise ImageRejected(f"The file looks like {sniffed} but its header cannot be read.", param=param,
                            code="image_invalid")
    got = f"got {sniffed}" if sniffed else "got an unrecognized file"
    raise ImageRejected(f"Expected one of {_format_list(limits)}; {got}.", param=param,
                        code="image_unsupported_format")


def _sniff_format(data: bytes) -> str | None:
    """The format the leading bytes claim, for error messages only: the file is not parsed."""
    prefix = data[:16]
    if re.search(rb"<svg[\s>]", data[:1024].lower()):
        return "SVG"
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return "JPEG" if name == "MPO" else name
        except Exception:  # a plugin's magic check choking on a short prefix means "not this format"
            continue
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency flattened onto white (what a viewer shows on a white page)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _encode_png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _format_list(limits: ImageLimits) -> str:
    return ", ".join(limits.allowed_formats)


def _too_large_message(num_bytes: int, limits: ImageLimits) -> str:
    return f"The image is {num_bytes} bytes; at most {limits.max_bytes} bytes are accepted (max_image_bytes)."


def _too_many_pixels_message(width: int, height: int, limits: ImageLimits) -> str:
    return (f"The image is {width}x{height} pixels; at most {limits.max_pixels} pixels (max_image_pixels) and "
            f"{limits.max_side} pixels per side are accepted.")
