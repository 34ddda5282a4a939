"""The one host image decoder: any accepted image file -> uint8 [C, H, W] with a model's channel count.

Folder loading, `predict` and `serve` all decode here, so that a file gets the same pixels on every path; resizing
to the model's input happens later, inside the model (`trainforge.models.registry.resize_images`). Given the size the
pixels are for, a JPEG of at least twice that size is decoded by draft: libjpeg scales it by 1/2, 1/4 or 1/8 inside
the DCT, to no less than twice the target, so that the antialiased resize that follows still averages pixels (about
an order of magnitude faster on phone photos; docs/RELIABILITY.md says how far from a full decode). Sizes are checked
from the file's header, before a single pixel is decoded, so that a small file that would expand into gigabytes
(a decompression bomb) costs nothing.

Conversions: GIF, WebP and PNG animations and multi-page TIFFs give their first frame; 16-bit grayscale is scaled
to 8 bits (v * 255 / 65535); palette, CMYK, YCbCr and alpha images are converted to grayscale or RGB by Pillow
(alpha dropped, as torchvision's decoder did).
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import DataError

__all__ = ["DECODER_VERSION", "FORMATS", "FORMAT_NAMES", "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "ImageError", "decode",
           "decoder_version", "is_grayscale", "open_image", "read_image"]

# Raised whenever the pixels a file decodes to change, so that decoded-image caches made before are not reused.
DECODER_VERSION = 2

# Pillow's names of the accepted formats (its JPEG reader also opens the multi-picture JPEGs some cameras write).
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
FORMAT_NAMES = "PNG, JPEG, BMP, WebP, 8-bit TIFF or GIF"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Largest image (width x height) any path decodes: 8192 x 8192, a 192 MiB RGB array, below Pillow's own
# decompression-bomb threshold (89 Mpixel) so that this check, not Pillow's warning, is what a user meets.
MAX_IMAGE_PIXELS = 1 << 26
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(DataError):
    """An image that cannot be used; `kind` is "unsupported" (a format other than the accepted ones), "too_large"
    (over a pixel cap) or "unreadable" (corrupt or truncated)."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def open_image(source: bytes | str | os.PathLike, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """The image at `source` (bytes or a path) opened with only its header read, checked to be an accepted format
    of 1 to `max_pixels` pixels; ImageError naming `name` (default: the path) otherwise."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source if not isinstance(source, bytes) else "image")
    target = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    Image.init()  # registers every plugin once; Image.open(formats=...) expects them registered
    try:
        image = Image.open(target, formats=FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(source, name) from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image of more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; at most "
                         f"{max_pixels:,} are accepted", "too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise ImageError(f"{name}: cannot read image ({exc.strerror or exc})", "unreadable") from None
        raise ImageError(f"{name}: not a readable {FORMAT_NAMES} image ({_first_line(exc)})", "unreadable") from None
    try:
        _check(image, name, max_pixels)
    except ImageError:
        image.close()
        raise
    return image


def _check(image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image of {width}x{height} pixels has no pixels", "unreadable")
    if width * height > max_pixels:
        raise ImageError(f"{name}: image of {width}x{height} = {width * height:,} pixels exceeds the limit of "
                         f"{max_pixels:,} pixels", "too_large")
    if image.mode == "F" or image.mode.startswith("I;32") or "F;" in image.mode:
        raise ImageError(f"{name}: floating-point or 32-bit pixels ({image.format} mode {image.mode}) are not "
                         f"supported; save it as an 8-bit image", "unsupported")


def decode(image, channels: int, name: str = "image", size: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of an image from `open_image` as uint8 [channels, H, W] (channels 1 or 3); ImageError when the
    file turns out corrupt or truncated. With `size` (height, width), the size they will be resized to, a JPEG at
    least twice as large is decoded at a reduced scale of no less than twice `size`."""
    try:
        image.seek(0)
        if size is not None and image.format in ("JPEG", "MPO"):
            _draft(image, size)
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            values = np.asarray(image).astype(np.float64)
            gray = np.rint(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)
            array = gray[None] if channels == 1 else np.repeat(gray[None], 3, axis=0)
        else:
            converted = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
            array = converted[None] if converted.ndim == 2 else converted.transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(f"{name}: not a readable {image.format} image ({_first_line(exc)})", "unreadable") from None
    finally:
        image.close()
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()  # Pillow's buffers are read-only; callers may write


def _draft(image, size: tuple[int, int]) -> None:
    height, width = size
    # Only where libjpeg can halve at least once above twice the target: at scale 1 it decodes every pixel anyway.
    if min(image.width // (2 * width), image.height // (2 * height)) >= 2:
        image.draft(None, (2 * width, 2 * height))  # None: the file's own colour mode, converted as any image is


def read_image(source: bytes | str | os.PathLike, channels: int, name: str | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [channels, H, W] of the image at `source` (bytes or a path): `open_image`, then `decode` (for pixels
    to be resized to `size`)."""
    name = name or str(source if not isinstance(source, bytes) else "image")
    return decode(open_image(source, name, max_pixels), channels, name, size)


def decoder_version() -> str:
    """What the decoded pixels depend on besides the file: this decoder's version, Pillow's and libjpeg's."""
    import PIL
    from PIL import features

    jpeg = features.version("libjpeg_turbo") or features.version("jpg")
    return f"{DECODER_VERSION}/pillow-{PIL.__version__}/jpeg-{jpeg}"


def is_grayscale(image) -> bool:
    """Whether an image from `open_image` holds only gray values, judged from its header (mode and palette)."""
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return False


def _unidentified(source: bytes | str | os.PathLike, name: str) -> ImageError:
    # Pillow reports a corrupt header of an accepted format as an unknown format: the signature tells them apart.
    if isinstance(source, bytes):
        head = source[:12]
    else:
        with open(source, "rb") as handle:
            head = handle.read(12)
    if not head:
        return ImageError(f"{name}: empty file; expected {FORMAT_NAMES}", "unreadable")
    known = next((f for signature, f in _SIGNATURES if head.startswith(signature)), None)
    if known is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        known = "WebP"
    if known is not None:
        return ImageError(f"{name}: not a readable {known} image (corrupt header)", "unreadable")
    return ImageError(f"{name}: {_format_of(source)}; expected {FORMAT_NAMES}", "unsupported")


def _format_of(source: bytes | str | os.PathLike) -> str:
    # Names a format Pillow knows but trainforge does not accept; reading the header of one is all it does.
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as other:
            return f"{other.format} images are not supported"
    except Exception:  # any failure only means the bytes are no image format Pillow knows
        return "not an image in a supported format"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)
