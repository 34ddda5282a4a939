"""Export a run's model to ONNX or a torch.export program, and prove the copy computes what the run's model does.

The exported graph keeps the contract of `trainforge.load()`: raw uint8 images [N, C, H, W] in (normalization,
resizing and channel adaptation inside the graph), logits out, with a dynamic batch axis. After writing, the file
is loaded back (ONNX Runtime for ONNX, torch.export.load for pt2) and compared with the PyTorch model on test images
of the run's data set. A file that fails to load or to run there, or whose logits differ by more than --atol (a NaN
difference included) or whose top-1 answers agree on fewer than --min-agreement of the images, is an error, not a
warning, and the file is removed.

Examples:
  trainforge export runs/x --format onnx --out model.onnx
  trainforge export runs/x --format onnx --opset 18 --out model.onnx --json
  trainforge export runs/x --format pt2 --out model.pt2        # torch.export program: torch.export.load(...)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runs
from .deploy.formats import (FORMATS, check_parity, export_onnx, export_program, load_program, onnx_predictor,
                             onnx_session, torch_predictor)
from .errors import ConfigError, DeployError

DEFAULT_CHECK_IMAGES = 1000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (ONNX Runtime, TensorRT, ...) or pt2 (a torch.export program) (default: onnx)")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset version (default: the exporter's own, 18 or newer)")
    parser.add_argument("--data-dir", help="root of the built-in data sets, for the parity check")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES, metavar="N",
                        help=f"test images compared between the export and the run's model "
                             f"(default: {DEFAULT_CHECK_IMAGES})")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |logit difference| (default: 1e-4)")
    parser.add_argument("--min-agreement", type=float, default=0.999,
                        help="smallest allowed fraction of identical top-1 answers (default: 0.999)")


def parity_images(run_dir: str | os.PathLike, count: int, data_dir: str | None = None) -> np.ndarray:
    """The first `count` test images of the data set a run was trained on, as uint8 [N, C, H, W]."""
    return runs.load_run_data(run_dir, data_dir).test.images[:count].numpy()


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "onnx", opset: int | None = None,
               data_dir: str | None = None, check_images: int = DEFAULT_CHECK_IMAGES, atol: float = 1e-4,
               min_agreement: float = 0.999, images: np.ndarray | None = None) -> dict[str, Any]:
    """Exports a run's model to `out` and checks it against the run's model on test images (or `images`, uint8
    [N, C, H, W]: `auto` checks on its held-out part).

    Raises DeployError, after removing `out`, when the written file fails to load or to run in its runtime, or
    disagrees beyond `atol` / `min_agreement` (a NaN difference counts as disagreeing).
    """
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if check_images < 1:
        raise ConfigError(f"--check-images must be >= 1, got {check_images}")
    if opset is not None and not 7 <= opset <= 30:
        raise ConfigError(f"--opset must be an ONNX opset version between 7 and 30, got {opset}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    model = runs.load(run_dir)
    images = parity_images(run_dir, check_images, data_dir) if images is None else images[:check_images]
    example = torch.from_numpy(images[:2])
    result: dict[str, Any] = {"format": format, "out": str(out), "run_dir": str(run_dir)}
    if format == "onnx":
        result.update(export_onnx(model, out, example, opset, model.info))
    else:
        result.update(export_program(model, out, example, model.info))
    # A temperature under 1 multiplies the network's own float error by 1/T in the logits compared: the bound holds
    # on the network's logits (a calibrated digits model, T 0.4, differed by 2.4e-4 with every answer the same).
    atol = atol / min(model.info.temperature, 1.0)
    try:
        result.update(_check_export(out, format, model, images, atol, min_agreement))
    except BaseException as exc:  # an interrupted check leaves no unchecked file either
        out.unlink(missing_ok=True)
        if isinstance(exc, DeployError):
            raise DeployError(f"{exc}; file removed") from None
        raise
    result["size_bytes"] = out.stat().st_size
    return result


def _check_export(out: Path, format: str, model: torch.nn.Module, images: np.ndarray, atol: float,
                  min_agreement: float) -> dict[str, Any]:
    """Loads the written file back in its runtime and compares it with the run's model; DeployError if it cannot."""
    if format == "onnx":
        checked_with, candidate = "onnxruntime", onnx_predictor(onnx_session(out))
    else:
        checked_with, candidate = "torch.export.load", torch_predictor(load_program(out)[0])
    try:
        parity = check_parity(torch_predictor(model), candidate, images)
    except DeployError:
        raise
    except Exception as exc:  # each runtime fails a call with its own exception types
        raise DeployError(f"{out}: the export loads but fails to run in {checked_with} "
                          f"({str(exc).strip().splitlines()[0][:300] if str(exc) else exc!r})") from None
    diff = parity["max_abs_diff"]
    if not (diff <= atol and parity["top1_agreement"] >= min_agreement):  # written so that a NaN difference fails
        why = " (logits that are not finite)" if np.isnan(diff) else ""
        raise DeployError(f"{out}: the export disagrees with the run's model on {parity['images']} test images "
                          f"(max |logit difference| {diff:.3g}{why}, allowed {atol:g}; top-1 agreement "
                          f"{parity['top1_agreement']:.2%}, required {min_agreement:.2%})")
    return {"checked_with": checked_with, "parity": parity}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = export_run(args.run_dir, args.out, args.format, args.opset, args.data_dir, args.check_images,
                        args.atol, args.min_agreement)
    if not (args.json or args.quiet):
        parity = result["parity"]
        opset = f" opset {result['opset']}," if result.get("opset") else ""
        print(f"wrote {result['out']} ({result['size_bytes']:,} bytes, {result['format']},{opset} "
              f"{result['exporter']} exporter)")
        print(f"checked with {result['checked_with']} on {parity['images']} test images: max |logit difference| "
              f"{parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.2%}")
    return result
