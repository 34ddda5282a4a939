"""Evaluate a run's model on the test set of its data (or of another data set with the same classes).

Example:
  trainforge eval runs/x --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import config as cfg
from . import runs
from .errors import DataError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    parser.add_argument("--data", help="data set to evaluate on (default: the run's own)")
    parser.add_argument("--data-dir", help="root of the built-in data sets")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16", "fp16"),
                        help="numeric precision of evaluation (default: auto)")
    parser.add_argument("--batch-size", type=int, default=2000, help="evaluation batch size (default: 2000)")


def evaluate_run(run_dir: str | Path, data: str | None = None, data_dir: str | None = None, device: str = "auto",
                 precision: str = "auto", batch_size: int = 2000) -> dict[str, Any]:
    """Test accuracy and loss of a run's model, with the run's training facts alongside."""
    import torch

    from .data import load_data
    from .train.device import resolve_device, resolve_precision, synchronize
    from .train.loop import evaluate

    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    run_dir = Path(run_dir)
    model = runs.load(run_dir)
    saved = cfg.load_file(cfg.TrainConfig, run_dir / runs.CONFIG_FILE)
    bundle = load_data(data or saved.data, data_dir or saved.data_dir, seed=saved.seed, image_size=saved.image_size,
                       val_fraction=saved.val_fraction)
    if len(bundle.classes) > len(model.classes):
        raise DataError(f"{bundle.name} has {len(bundle.classes)} classes but the model of {run_dir} predicts "
                        f"{len(model.classes)}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    labels = bundle.test.labels
    # A model over several data sets' classes (`finetune --update`) lists each set's classes among its own.
    if set(bundle.classes) <= set(model.classes) and bundle.classes != model.classes[:len(bundle.classes)]:
        labels = torch.tensor([model.classes.index(c) for c in bundle.classes])[labels]
    images, labels = bundle.test.images.to(dev), labels.to(dev)
    start = time.perf_counter()
    acc, loss = evaluate(model, images, labels, batch_size, dev, prec)
    synchronize(dev)
    seconds = time.perf_counter() - start
    summary_path = run_dir / runs.SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"test_acc": acc, "test_loss": loss, "test_samples": len(labels), "data": bundle.name,
            "eval_seconds": seconds, "samples_per_second": len(labels) / seconds if seconds > 0 else 0.0,
            "train_seconds": summary.get("train_seconds"), "epochs": summary.get("epochs"),
            "device": str(dev), "precision": prec, "world_size": 1, "run_dir": str(run_dir)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = evaluate_run(args.run_dir, args.data, args.data_dir, args.device, args.precision, args.batch_size)
    if not (args.json or args.quiet):
        print(f"{result['data']} test accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f} "
              f"({result['test_samples']} images, {result['samples_per_second']:,.0f} images/s on {result['device']})")
    return result
