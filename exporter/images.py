"""Encoded images: decoding within bounds, and downscaling before any per-pixel work.

An image line is attacker-controlled and compresses extremely well: 64 KB of base64
hold a 4096 x 4096 PNG of zeros, 50 MB of pixels once decoded. So the pixel count in
the header is checked *before* anything is decoded (PIL's ``Image.open`` reads the
header only), against ``limits.max_image_pixels``, and PIL's process-wide
``Image.MAX_IMAGE_PIXELS`` is never relied on. Two more bombs fit in a line and are
defused before PIL sees the bytes:

- PNG text and profile chunks (zTXt, iTXt, iCCP) are decompressed by ``Image.open``
  itself, up to 64 MB in total: 125 ms for a 275 KB line (case ``png_text_bomb`` of
  ``bench/hostile_images.py``). Only the chunks that define the pixels (IHDR, PLTE,
  tRNS, IDAT, IEND) are passed on; the others never change the RGB values the exporter
  uses. This also drops APNG frames other than the default image.
- A progressive JPEG may repeat a scan, and libjpeg decodes each over the whole image:
  58,000 12-byte scans of a 1024 x 1024 image decode in 5.9 s (case ``jpeg_scan_bomb``).
  JPEGs with more than :data:`MAX_JPEG_SCANS` SOS markers are refused.

Detectors that hash pixels bound their work with :func:`downscale`.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
MAX_PNG_CHUNKS = 4096  # a 1 MiB PNG in libpng's 8 KiB IDAT chunks has 128
MAX_HASHED_SIDE = 256  # detectors hash images downscaled to at most this many pixels a side
MAX_JPEG_SCANS = 100  # libjpeg-turbo's own tools suggest a limit of 500; encoders write 1 to about 20


class ImageError(ValueError):
    """An image that cannot be used; the message says why without echoing its bytes."""


def decode_image(b64: object, max_pixels: int) -> np.ndarray:
    """Base64 PNG or JPEG -> H x W x 3 uint8 RGB pixels; raises :class:`ImageError`.

    The pixel count is checked from the header before decoding, so the decoded image
    takes at most ``max_pixels`` times 8 bytes (16-bit RGBA) on the way to RGB.
    """
    if not isinstance(b64, str):
        raise ImageError("image_b64 must be a base64 string")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image_b64 is not valid base64") from None
    if data.startswith(PNG_SIGNATURE):
        data = _pixel_chunks(data)
    elif data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # in entropy-coded data 0xFF is always escaped: these are SOS markers
        raise ImageError(f"JPEG with more than {MAX_JPEG_SCANS} scans")
    try:
        # formats=: no other format's parser ever sees the bytes.
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image of {width}x{height} pixels exceeds limits.max_image_pixels ({max_pixels})")
            img.load()
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # convert() would copy RGB
    except ImageError:
        raise
    except Exception as exc:  # anything PIL raises on hostile bytes: the image does not decode
        raise ImageError(f"image does not decode as PNG or JPEG ({type(exc).__name__})") from None


def _pixel_chunks(data: bytes) -> bytes:
    """The PNG ``data`` with only the chunks in :data:`PNG_PIXEL_CHUNKS`, verbatim (CRCs included).

    A truncated last chunk is kept as it is, for PIL to reject. Raises :class:`ImageError`
    beyond :data:`MAX_PNG_CHUNKS` chunks, which bounds this loop.
    """
    kept = [PNG_SIGNATURE]
    pos, n = len(PNG_SIGNATURE), 0
    while pos < len(data):
        n += 1
        if n > MAX_PNG_CHUNKS:
            raise ImageError(f"PNG with more than {MAX_PNG_CHUNKS} chunks")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
        if kind in PNG_PIXEL_CHUNKS or end > len(data):
            kept.append(data[pos:end])
        if kind == b"IEND":
            break
        pos = end
    return b"".join(kept)


def downscale(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """``pixels`` (H x W or H x W x C) shrunk by the smallest integer factor f that brings both sides to at most ``max_side``.

    Each output pixel is the mean of an f x f block, so near-identical images stay
    near-identical. Images within the bound are returned as they are. uint8 grey, RGB
    and RGBA go through PIL's ``Image.reduce`` (2 ms for 1024 x 1024 x 3, 10 ms with
    numpy); anything else through numpy block sums (partial edge blocks dropped).
    """
    h, w = pixels.shape[:2]
    f = -(-max(h, w) // max_side)
    if f <= 1:
        return pixels
    if pixels.dtype == np.uint8 and (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        return np.asarray(Image.fromarray(pixels).reduce(f))
    hh, ww = h // f, w // f
    rest = pixels.shape[2:]
    c = int(np.prod(rest)) if rest else 1
    block = pixels[: hh * f, : ww * f].reshape(hh, f, ww * f * c)
    sums = block.sum(axis=1, dtype=np.float64).reshape(hh, ww, f, c).sum(axis=2)
    out = sums / (f * f)
    if pixels.dtype.kind in "iu":
        out = np.floor(out).astype(pixels.dtype)
    return out.reshape((hh, ww) + rest)
