"""The IDX file format (MNIST and relatives): a strict reader that turns every malformed input into a DataError.

Layout: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32 sizes, then the
elements in row-major order, big-endian. Files may be gzip-compressed; compression is detected by content.
"""

import gzip
import math
import os
import zlib
from typing import BinaryIO

import numpy as np

from trainforge.errors import DataError

__all__ = ["parse_idx", "read_idx", "read_idx_bytes"]

# Type code -> big-endian element dtype. 0x0A is unassigned in the format.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_DIMS = 4
# Refuse headers that would make us allocate absurd amounts of memory (a corrupt or hostile file).
_MAX_ELEMENTS = 2**31
_GZIP_MAGIC = b"\x1f\x8b"
# Small enough that a truncated gzip stream still reports roughly how much it held.
_CHUNK = 1 << 16


def _header_size(ndim: int) -> int:
    return 4 + 4 * ndim


def _parse_header(data: bytes | bytearray | memoryview, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Validates the magic number and dimensions at the start of `data`; returns (big-endian dtype, shape)."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header (expected at least 4 bytes, got {len(data)})")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{name}: not an IDX file (expected magic bytes 00 00, got {data[0]:02x} {data[1]:02x})"
        )
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DataError(f"{name}: unknown IDX element type 0x{code:02X} (expected one of {known})")
    if not 1 <= ndim <= _MAX_DIMS:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions (expected 1 to {_MAX_DIMS})")
    if len(data) < _header_size(ndim):
        raise DataError(
            f"{name}: truncated IDX header (expected {_header_size(ndim)} bytes for {ndim} dimensions, "
            f"got {len(data)})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(shape) > _MAX_ELEMENTS:
        raise DataError(
            f"{name}: IDX header declares shape {shape} = {math.prod(shape)} elements "
            f"(refusing more than {_MAX_ELEMENTS})"
        )
    return _DTYPES[code], shape


def _payload_size(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def parse_idx(data: bytes | bytearray | memoryview, name: str) -> np.ndarray:
    """Parses a whole decompressed IDX file.

    Returns an array of the file's shape and element type in native byte order. For single-byte types the array
    shares memory with `data` (writable when `data` is a bytearray). Raises DataError, naming `name`, for any
    malformed input and for nothing else.
    """
    dtype, shape = _parse_header(data, name)
    offset = _header_size(len(shape))
    expected = _payload_size(dtype, shape)
    got = len(data) - offset
    if got < expected:
        raise DataError(
            f"{name}: truncated IDX data (expected {expected} bytes for shape {shape}, got {got})"
        )
    if got > expected:
        raise DataError(
            f"{name}: {got - expected} trailing bytes after the IDX data "
            f"(expected {expected} bytes for shape {shape}, got {got})"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    # Multi-byte types are stored big-endian; callers should never have to think about byte order.
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def _read_into(stream: BinaryIO, buf: bytearray, size: int) -> None:
    """Appends from `stream` to `buf` until it holds `size` bytes or the stream ends.

    Grows the buffer as data arrives rather than preallocating, so a header that lies about its size cannot make
    us allocate more than the file really holds.
    """
    while len(buf) < size:
        chunk = stream.read(min(_CHUNK, size - len(buf)))
        if not chunk:
            return
        buf += chunk


def _read_checked(stream: BinaryIO, buf: bytearray, name: str) -> None:
    """Fills `buf` with one whole IDX file from `stream`, raising DataError if it is malformed, short or too long."""
    _read_into(stream, buf, 4)
    if len(buf) >= 4 and buf[0] == 0 and buf[1] == 0 and 1 <= buf[3] <= _MAX_DIMS:
        _read_into(stream, buf, _header_size(buf[3]))
    dtype, shape = _parse_header(buf, name)
    offset = _header_size(len(shape))
    expected = _payload_size(dtype, shape)
    # One byte more than declared tells trailing garbage apart from an exact fit without reading all of it.
    _read_into(stream, buf, offset + expected + 1)
    got = len(buf) - offset
    if got < expected:
        raise DataError(f"{name}: truncated IDX data (expected {expected} bytes for shape {shape}, got {got})")
    if got > expected:
        raise DataError(
            f"{name}: trailing bytes after the IDX data (expected {expected} bytes for shape {shape}, "
            "the file holds more)"
        )


def _progress(buf: bytearray, name: str) -> str:
    """Describes how far a truncated stream got, for the error message."""
    try:
        dtype, shape = _parse_header(buf, name)
    except DataError:
        return f"got {len(buf)} bytes, not even a whole IDX header"
    got = len(buf) - _header_size(len(shape))
    return f"expected {_payload_size(dtype, shape)} bytes of data for shape {shape}, got {got}"


def read_idx_bytes(path: str | os.PathLike) -> bytearray:
    """Returns the decompressed content of the IDX file at `path` (gzip detected by its magic bytes, not its name).

    The header is valid and the content exactly as long as the header declares; otherwise, and for a missing or
    unreadable file or a truncated or corrupt gzip stream, raises DataError naming the file.
    """
    name = os.fspath(path)
    buf = bytearray()
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    _read_checked(stream, buf, name)
            else:
                _read_checked(raw, buf, name)
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, expected an IDX file") from None
    except EOFError:
        raise DataError(f"{name}: truncated gzip stream ({_progress(buf, name)})") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip stream ({e})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read file ({e.strerror or e})") from None
    return buf


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or raw; see parse_idx for what is returned and read_idx_bytes for errors."""
    return parse_idx(read_idx_bytes(path), os.fspath(path))
