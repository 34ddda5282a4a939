"""The decoded-image cache: an image folder decoded once at a size and channel count, reused by every later run.

One entry per (folder, size, channels, decoder version) in $TRAINFORGE_CACHE/decoded (default
~/.cache/trainforge/decoded): `<key>.npy`, every image of the folder (train/ then val/, in the order the folder is
listed) as uint8 [N, C, H, W], memory-mapped when read, and `<key>.json`, the files with their sizes and
modification times, the array's shape and its CRC-32. The array is written under a temporary name by the decoding
processes, flushed and renamed, and the .json is written (atomically) last; an entry is used only when its .json
matches the folder's files as they are now and the array's size and checksum, and is decoded again otherwise. A lock
file makes processes that want the same entry (tune workers, the ranks of one run) take turns: the second reads what
the first decoded.

Where the entry cannot be written (a directory that is not writable, a full disk), the folder is decoded into memory
instead, with one line saying why. Nothing is ever written into the image folder.

Several sizes: an entry holds one size, and a smaller one is never derived from it behind a run's back (a run's
pixels would then depend on what happened to be cached before). A search over sizes (say 112 to 224 px) loads its
folder once at the largest and gives smaller candidates those images: a model resizes its input to its own size
inside itself, with the same resize, so each file is decoded once for the whole search.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..hardware.ceilings import cache_dir
from ..hardware.memory import format_bytes
from .images import decoder_version

__all__ = ["Decoded", "FULL_ENV", "cache_entries", "clear_cache", "decode_folder", "decoded_dir"]

FORMAT = 1
# Test hook: makes reserving the cache file's space fail as on a full disk.
FULL_ENV = "TRAINFORGE_TEST_CACHE_FULL"
# A file still changing after this many re-decodes stops the run: its pixels could be from no version of it.
CHANGE_ROUNDS = 3
_CRC_CHUNK = 1 << 24


def decoded_dir() -> Path:
    """Where decoded-image caches live: `decoded/` in $TRAINFORGE_CACHE (default ~/.cache/trainforge)."""
    return cache_dir() / "decoded"


@dataclasses.dataclass
class Decoded:
    """A folder's images, decoded: memory-mapped from the cache file (`path`), or in memory (`path` None)."""

    images: torch.Tensor  # uint8 [N, C, H, W], row i for paths[i]
    note: str  # one line: a cache hit, what decoding took, or why the cache was not used
    path: Path | None = None


def decode_folder(root: str | os.PathLike, paths: Sequence[Path], size: tuple[int, int], channels: int, *,
                  progress: bool = False, in_memory: bool = True, workers: int | None = None) -> Decoded | None:
    """`paths` (the files of the image folder `root`) decoded to uint8 channels x size, from the cache when it
    holds them as they are now, else decoded in parallel and cached. Where the cache cannot be written, decoded
    into memory, or None without `in_memory` (the caller then decodes batch by batch)."""
    root = Path(root)
    before = _fingerprint(root, paths)
    entry = decoded_dir() / _key(root, size, channels)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.with_suffix(".lock"), "a")
    except OSError as exc:
        return _without_cache(root, paths, size, channels, progress, in_memory, workers,
                              f"the decoded-image cache {entry.parent} is not writable ({_reason(exc)})")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        images, problem = _open_entry(entry, before, (len(paths), channels, *size))
        if images is not None:
            return Decoded(images, f"decoded cache hit: {entry.with_suffix('.npy')} "
                                   f"({format_bytes(images.numel())}, {len(paths):,} images)", entry)
        return _decode_and_cache(root, paths, size, channels, entry, before, problem, progress, in_memory, workers)


def _key(root: Path, size: tuple[int, int], channels: int) -> str:
    facts = json.dumps([str(root.resolve()), list(size), channels, decoder_version()])
    return f"{root.resolve().name[:40]}-{size[0]}x{size[1]}x{channels}-{hashlib.sha256(facts.encode()).hexdigest()[:16]}"


def _fingerprint(root: Path, paths: Sequence[Path]) -> list[list[Any]]:
    """[relative path, size, modification time in ns] of each file: what the cached pixels were decoded from."""
    rows = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({_reason(exc)})") from None
        rows.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return rows


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _open_entry(entry: Path, files: list[list[Any]], shape: tuple[int, ...]) -> tuple[torch.Tensor | None, str]:
    """The entry's images memory-mapped, or None and why it is not usable ("" when there is none)."""
    meta_path, array_path = entry.with_suffix(".json"), entry.with_suffix(".npy")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"its description {meta_path} is unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("decoder") != decoder_version():
        return None, "it was written by another version of trainforge's decoder"
    if meta.get("files") != files:
        changed = _changes(meta.get("files"), files)
        return None, f"the folder changed since it was decoded ({changed})"
    try:
        # Copy-on-write: pages come from the page cache and are shared by every process reading the entry.
        array = np.load(array_path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"{array_path} is damaged ({exc})"
    if array.shape != shape or array.dtype != np.uint8:
        return None, f"{array_path} holds {array.dtype} {array.shape}, expected uint8 {shape}"
    if _crc(array) != meta.get("crc32"):
        return None, f"{array_path} does not match its checksum (changed since it was written)"
    return torch.from_numpy(array), ""


def _changes(old: Any, new: list[list[Any]]) -> str:
    try:
        old_map = {name: (size, mtime) for name, size, mtime in old}
    except (TypeError, ValueError):
        return "its file list is unreadable"
    new_map = {name: (size, mtime) for name, size, mtime in new}
    added = len(new_map.keys() - old_map.keys())
    removed = len(old_map.keys() - new_map.keys())
    changed = sum(1 for name in new_map.keys() & old_map.keys() if new_map[name] != old_map[name])
    return f"{changed} changed, {added} added, {removed} removed"


def _crc(array: np.ndarray) -> int:
    flat = array.reshape(-1)
    crc = 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start:start + _CRC_CHUNK], crc)
    return crc


def _decode_and_cache(root: Path, paths: Sequence[Path], size: tuple[int, int], channels: int, entry: Path,
                      before: list[list[Any]], problem: str, progress: bool, in_memory: bool,
                      workers: int | None) -> Decoded | None:
    from .folder import decode_into

    array_path = entry.with_suffix(".npy")
    for stale in entry.parent.glob(f".{array_path.name}.*.part"):  # left by a killed decode; the lock is ours
        stale.unlink(missing_ok=True)
    part = entry.parent / f".{array_path.name}.{os.getpid()}.part"
    shape = (len(paths), channels, *size)
    try:
        out = _allocate(part, shape)
    except OSError as exc:
        part.unlink(missing_ok=True)
        return _without_cache(root, paths, size, channels, progress, in_memory, workers,
                              f"no room for the decoded-image cache {array_path} ({_reason(exc)})")
    try:
        seconds = decode_into(paths, size, channels, out, workers=workers, progress=progress)
        files = _settle(root, paths, size, channels, out, before)
    except BaseException:
        del out
        part.unlink(missing_ok=True)
        raise
    redo = f"{problem}; " if problem else ""
    note = (f"decoded {len(paths):,} images to {size[1]}x{size[0]}x{channels} in {seconds:.1f} s "
            f"({len(paths) / max(seconds, 1e-9):,.0f} images/s)")
    try:
        _publish(part, array_path, entry.with_suffix(".json"), out, files, root, size, channels)
    except OSError as exc:
        images = torch.from_numpy(np.array(out))  # the pixels are whole; only keeping them failed
        del out
        part.unlink(missing_ok=True)
        return Decoded(images, f"{redo}{note}; not cached: cannot write {array_path} ({_reason(exc)})")
    del out
    images, problem = _open_entry(entry, files, shape)
    if images is None:  # another process or the disk changed it between the rename and now
        raise DataError(f"the decoded-image cache {array_path} was changed as it was written ({problem})")
    return Decoded(images, f"{redo}{note}, cached at {array_path} ({format_bytes(images.numel())})", entry)


def _allocate(part: Path, shape: tuple[int, ...]) -> np.memmap:
    """The temporary cache file with its .npy header and all its space reserved, memory-mapped for writing.

    Reserving the space up front turns a full disk into an error here, not a SIGBUS in a process writing pixels."""
    nbytes = int(np.prod(shape))
    with open(part, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = handle.tell()
        if os.environ.get(FULL_ENV):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if nbytes:
            os.posix_fallocate(handle.fileno(), offset, nbytes)
    return np.memmap(part, np.uint8, "r+", offset, shape) if nbytes else np.zeros(shape, np.uint8)


def _settle(root: Path, paths: Sequence[Path], size: tuple[int, int], channels: int, out: np.ndarray,
            before: list[list[Any]]) -> list[list[Any]]:
    """Decodes again the files that changed while the folder was decoded, until none did; their fingerprint."""
    from .folder import decode_into, shared_array

    for _ in range(CHANGE_ROUNDS):
        after = _fingerprint(root, paths)
        changed = [i for i, (old, new) in enumerate(zip(before, after)) if old != new]
        if not changed:
            return after
        again = shared_array(len(changed), channels, size)
        decode_into([paths[i] for i in changed], size, channels, again, workers=1)
        out[changed] = again
        before = after
    raise DataError(f"{paths[changed[0]]}: changed while the folder was decoded, {CHANGE_ROUNDS} times; decode it "
                    f"once the folder has settled")


def _publish(part: Path, array_path: Path, meta_path: Path, out: np.memmap, files: list[list[Any]], root: Path,
             size: tuple[int, int], channels: int) -> None:
    from ..runs import write_json

    crc = _crc(out)
    if isinstance(out, np.memmap):
        out.flush()
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    meta_path.unlink(missing_ok=True)  # the old description must not pass for the new array's
    os.replace(part, array_path)
    write_json(meta_path, {"format": FORMAT, "decoder": decoder_version(), "folder": str(root.resolve()),
                           "size": list(size), "channels": channels, "shape": list(out.shape), "crc32": crc,
                           "files": files})


def _without_cache(root: Path, paths: Sequence[Path], size: tuple[int, int], channels: int, progress: bool,
                   in_memory: bool, workers: int | None, why: str) -> Decoded | None:
    from .folder import decode_into, shared_array

    if not in_memory:
        return None
    out = shared_array(len(paths), channels, size)
    seconds = decode_into(paths, size, channels, out, workers=workers, progress=progress)
    return Decoded(torch.from_numpy(out), f"{why}; decoded {len(paths):,} images into memory in {seconds:.1f} s")


def cache_entries() -> list[dict[str, Any]]:
    """One row per decoded-image cache: folder, size, channels, images, bytes on disk, file."""
    rows = []
    for meta_path in sorted(decoded_dir().glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            array = meta_path.with_suffix(".npy")
            rows.append({"folder": meta["folder"], "size": meta["size"], "channels": meta["channels"],
                         "images": meta["shape"][0], "bytes": array.stat().st_size, "file": str(array)})
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            rows.append({"folder": None, "size": None, "channels": None, "images": None,
                         "bytes": _size(meta_path.with_suffix(".npy")), "file": str(meta_path.with_suffix(".npy"))})
    return rows


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def clear_cache() -> tuple[int, int]:
    """Removes every decoded-image cache (and nothing else of $TRAINFORGE_CACHE): (files removed, bytes freed)."""
    count = freed = 0
    folder = decoded_dir()
    if not folder.is_dir():
        return 0, 0
    for path in folder.iterdir():
        if path.is_file() and (path.suffix in (".npy", ".json", ".lock") or path.name.endswith(".part")):
            freed += _size(path)
            path.unlink(missing_ok=True)
            count += 1
    return count, freed
