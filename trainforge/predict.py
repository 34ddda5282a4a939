"""Classify image files, or every image in folders, with a run's model.

IMAGE is a file (PNG, JPEG, BMP, WebP, 8-bit TIFF, GIF, or a .npy array of shape HxW, CxHxW or HxWxC: uint8 0-255,
or floats in 0-1) or a folder, searched recursively for such files (at most --max-files, default 10,000). Each file
is decoded by the same decoder as training folders and `serve` (sizes checked from its header first, at most
64 Mpixel per image; a JPEG of 2x the model's input or more decoded by draft, as in training), then converted and
resized to the model's input inside the model, exactly as in training.

Example:
  trainforge predict runs/x digit.png shirt.jpg --json
  trainforge predict runs/x photos/ --top-k 3
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from . import runs
from .data.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, open_image
from .data.images import read_image as decode_file
from .errors import DataError
from .train.device import resolve_device

MAX_FILES = 10_000
_SUFFIXES = IMAGE_SUFFIXES | {".npy"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    parser.add_argument("images", metavar="IMAGE", nargs="+",
                        help="image or .npy files, or folders of them (searched recursively)")
    parser.add_argument("--top-k", type=int, default=1, help="also list the k most likely labels (default: 1)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    parser.add_argument("--max-files", type=int, default=MAX_FILES,
                        help=f"most files taken from the folders and files given (default: {MAX_FILES:,})")


def image_files(paths: list[str | Path], max_files: int = MAX_FILES) -> list[Path]:
    """The files named in `paths`, with each folder replaced by its image and .npy files (recursively, sorted);
    DataError for a missing path or more than `max_files` files."""
    if max_files < 1:
        raise DataError(f"--max-files must be >= 1, got {max_files}")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{path}: folder holds no image files ({', '.join(sorted(_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
        if len(files) > max_files:
            raise DataError(f"{path}: more than {max_files:,} files to classify; pass --max-files to allow more")
    return files


def check_file(path: Path) -> None:
    """Checks an image or .npy file from its header (format, size within the pixel cap), decoding nothing."""
    if path.suffix.lower() == ".npy":
        _npy_header(path)
    else:
        open_image(path).close()


def read_image(path: str | Path, channels: int, size: int | None = None) -> torch.Tensor:
    """A uint8 tensor [C, H, W] from an image or .npy file (an image for a model of input `size`: a large JPEG is
    decoded by draft as in training), or a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    return torch.from_numpy(decode_file(path, channels, size=None if size is None else (size, size)))


def _npy_header(path: Path) -> tuple[int, ...]:
    import numpy as np

    try:
        # A memory map reads the header only; the shape decides before any data is read.
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if math.prod(shape) > 3 * MAX_IMAGE_PIXELS:  # the pixel cap, for up to 3 channels
        raise DataError(f"{path}: array of shape {shape} exceeds the limit of {MAX_IMAGE_PIXELS:,} pixels")
    return shape


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

    _npy_header(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape[1:]) < 1:
        raise DataError(f"{path}: expected an image array of shape HxW, CxHxW or HxWxC with C 1 or 3, "
                        f"got {array.shape}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise DataError(f"{path}: array holds NaN/Inf")
        array = array * 255.0 if array.max() <= 1.0 else array
    elif array.dtype.kind not in "uib":
        raise DataError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    return torch.from_numpy(np.clip(array, 0, 255).astype(np.uint8))


def predict_files(run_dir: str | Path, files: list[str | Path], top_k: int = 1, device: str = "cpu",
                  max_files: int = MAX_FILES) -> list[dict[str, Any]]:
    """One `{file, label, confidence}` (and `top_k` alternatives when asked) per file, in order, folders expanded
    (see `image_files`); every file's header is checked before any file is decoded."""
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    # The arguments' mistakes in their order on the command line: the run first, then the files.
    device = resolve_device(device)
    model = runs.load(run_dir, device=device)
    files = image_files(files, max_files)
    for file in files:
        check_file(file)
    channels = model.info.in_channels
    results = []
    with torch.inference_mode():
        for file in files:
            image = read_image(file, channels, model.info.image_size)
            probs = torch.softmax(model(image.unsqueeze(0).to(device)).float(), dim=1)[0]
            conf, idx = probs.topk(min(top_k, len(probs)))
            entry = {"file": str(file), "label": model.classes[int(idx[0])], "confidence": float(conf[0])}
            if top_k > 1:
                entry["top"] = [{"label": model.classes[int(i)], "confidence": float(c)} for c, i in zip(conf, idx)]
            results.append(entry)
    return results


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = predict_files(args.run_dir, args.images, args.top_k, args.device, args.max_files)
    if not (args.json or args.quiet):
        for r in results:
            print(f"{r['file']}: {r['label']} ({r['confidence']:.3f})")
    return results
