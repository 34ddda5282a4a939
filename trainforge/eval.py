"""Evaluate a run's model on the test set of its data (or of another data set with the same classes), or with
--split val on the part of the training images a --holdout run held out.

Examples:
  trainforge eval runs/x --json
  trainforge eval runs/tuned --split val     # the validation accuracy a --holdout run (e.g. from tune) reported
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import config as cfg
from . import runs
from .errors import ConfigError, DataError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    parser.add_argument("--data", help="data set to evaluate on (default: the run's own)")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="the data set's test split, or the held-out part of a --holdout run (default: test)")
    parser.add_argument("--data-dir", help="root of the built-in data sets")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--precision", choices=("auto", "32", "bf16", "fp16"),
                        help="numeric precision of evaluation (default: the one the run evaluated in, so that its "
                             "reported accuracy is reproduced; auto where it did not record one)")
    parser.add_argument("--batch-size", type=int,
                        help="evaluation batch size (default: the memory plan's, which fits --memory-budget and, on "
                             "a CPU, the last-level cache)")
    parser.add_argument("--memory-budget", help="memory the evaluation may use, e.g. 4G (default: half of what is "
                                                "available)")


def evaluate_run(run_dir: str | Path, data: str | None = None, data_dir: str | None = None, device: str = "auto",
                 precision: str | None = None, batch_size: int | None = None, split: str = "test",
                 memory_budget: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Accuracy and loss of a run's model on `split` ("test" or "val"), with the run's training facts alongside.
    `precision` None: the run's recorded evaluation precision; `batch_size` None: the memory plan's."""
    import torch

    from .train.device import resolve_device, resolve_precision, synchronize
    from .train.loop import evaluate
    from .train.plan import PROBE_SIZES, eval_batch_size

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    run_dir = Path(run_dir)
    model = runs.load(run_dir)
    name, classes, images, saved = _split(run_dir, data, data_dir, split, progress)
    if len(classes) > len(model.classes):
        raise DataError(f"{name} has {len(classes)} classes but the model of {run_dir} predicts "
                        f"{len(model.classes)}")
    dev = resolve_device(device)
    prec = resolve_precision(precision or saved.eval_precision or "auto", dev)
    model.to(dev)
    if batch_size is None:
        batch_size, note = eval_batch_size(model, images.images[:PROBE_SIZES[-1]], dev, prec, memory_budget, None)
        if progress:
            print(note, file=sys.stderr)
    labels = images.labels
    # A model over several data sets' classes (`finetune --update`) lists each set's classes among its own.
    if set(classes) <= set(model.classes) and classes != model.classes[:len(classes)]:
        labels = torch.tensor([model.classes.index(c) for c in classes])[labels]
    start = time.perf_counter()
    acc, loss = evaluate(model, images.images.to(dev), labels.to(dev), batch_size, dev, prec)
    synchronize(dev)
    seconds = time.perf_counter() - start
    summary_path = run_dir / runs.SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"test_acc": acc, "test_loss": loss, "test_samples": len(labels), "split": split, "data": name,
            "eval_seconds": seconds, "samples_per_second": len(labels) / seconds if seconds > 0 else 0.0,
            "batch_size": batch_size,
            "train_seconds": summary.get("train_seconds"), "epochs": summary.get("epochs"),
            "device": str(dev), "precision": prec, "world_size": 1, "run_dir": str(run_dir)}


def _split(run_dir: Path, data: str | None, data_dir: str | None, split: str,
           progress: bool) -> tuple[str, list[str], Any, cfg.TrainConfig]:
    """(data set name, its classes, the ImageSet of `split`, the run's config)."""
    from .data import load_data

    if data is None:
        run_data = runs.load_run_data(run_dir, data_dir, progress=progress)
        if split == "val" and run_data.val is None:
            raise ConfigError(f"--split val: {run_dir} was trained without --holdout, so it held no validation "
                              f"images out; evaluate it on --split test")
        images = run_data.val if split == "val" else run_data.test
        return run_data.dataset.name, run_data.dataset.classes, images, run_data.config
    if split == "val":
        raise ConfigError("--split val is the held-out part of the run's own data; it does not combine with --data")
    saved = cfg.load_file(cfg.TrainConfig, run_dir / runs.CONFIG_FILE)
    bundle = load_data(data, data_dir or saved.data_dir, seed=saved.seed, image_size=saved.image_size,
                       val_fraction=saved.val_fraction, progress=progress)
    return bundle.name, bundle.classes, bundle.test, saved


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = evaluate_run(args.run_dir, args.data, args.data_dir, args.device, args.precision, args.batch_size,
                          args.split, args.memory_budget, progress=not (args.json or args.quiet))
    if not (args.json or args.quiet):
        split = "validation" if args.split == "val" else "test"
        print(f"{result['data']} {split} accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f} "
              f"({result['test_samples']} images, {result['samples_per_second']:,.0f} images/s on {result['device']})")
    return result
