"""Classify image files with a run's model.

Images may be PNG or JPEG, or .npy arrays of shape HxW, CxHxW or HxWxC (uint8 0-255, or floats in 0-1). They are
converted and resized to the model's input inside the model, exactly as in training.

Example:
  trainforge predict runs/x digit.png shirt.jpg --json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from . import runs
from .errors import DataError
from .train.device import resolve_device

MAX_SIDE = 4096


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="PNG/JPEG/.npy files")
    parser.add_argument("--top-k", type=int, default=1, help="also list the k most likely labels (default: 1)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """A uint8 tensor [C, H, W] from an image or .npy file, or a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        image = decode_image(data, mode=mode)
    except (RuntimeError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({str(exc).splitlines()[0][:120]})") from None
    if max(image.shape[-2:]) > MAX_SIDE:
        raise DataError(f"{path}: image of {image.shape[-1]}x{image.shape[-2]} pixels exceeds {MAX_SIDE} per side")
    return image


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

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
    if max(array.shape[1:]) > MAX_SIDE:
        raise DataError(f"{path}: array of {array.shape} exceeds {MAX_SIDE} pixels per side")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise DataError(f"{path}: array holds NaN/Inf")
        array = array * 255.0 if array.max() <= 1.0 else array
    elif array.dtype.kind not in "uib":
        raise DataError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    return torch.from_numpy(np.clip(array, 0, 255).astype(np.uint8))


def predict_files(run_dir: str | Path, files: list[str], top_k: int = 1, device: str = "cpu") -> list[dict[str, Any]]:
    """One `{file, label, confidence}` (and `top_k` alternatives when asked) per file, in order."""
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    device = resolve_device(device)
    model = runs.load(run_dir, device=device)
    channels = model.info.in_channels
    results = []
    with torch.inference_mode():
        for file in files:
            image = read_image(file, channels)
            probs = torch.softmax(model(image.unsqueeze(0).to(device)).float(), dim=1)[0]
            conf, idx = probs.topk(min(top_k, len(probs)))
            entry = {"file": str(file), "label": model.classes[int(idx[0])], "confidence": float(conf[0])}
            if top_k > 1:
                entry["top"] = [{"label": model.classes[int(i)], "confidence": float(c)} for c, i in zip(conf, idx)]
            results.append(entry)
    return results


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = predict_files(args.run_dir, args.images, args.top_k, args.device)
    if not (args.json or args.quiet):
        for r in results:
            print(f"{r['file']}: {r['label']} ({r['confidence']:.3f})")
    return results
