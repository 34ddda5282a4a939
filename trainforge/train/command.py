"""Train an image classifier.

Examples:
  trainforge train                                   # the reference recipe: linear model on MNIST
  trainforge train --data mnist --model cnn          # >= 99% on MNIST
  trainforge train --data fashion-mnist --recipe cnn --epochs 5
  trainforge train --data path/to/folder --model resnet18 --image-size 64
  trainforge train --config runs/x/config.yaml       # re-run a saved run
  trainforge train --resume runs/x                   # continue an interrupted run
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import config as cfg
from ..errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file; flags given here override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    cfg.add_arguments(parser.add_argument_group("training options"), cfg.TrainConfig)


def typed_options(args: argparse.Namespace, cls: type = cfg.TrainConfig) -> dict[str, Any]:
    """The config fields the user typed on the command line (flags default to SUPPRESS)."""
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(args).items() if k in names}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .loop import train

    layers: list[dict[str, Any]] = []
    if args.config:
        if args.resume:
            raise ConfigError("--config and --resume exclude each other: a resumed run uses its saved config")
        layers.append(cfg.to_dict(cfg.load_file(cfg.TrainConfig, args.config)))
    layers.append(typed_options(args))
    config = cfg.merge(cfg.TrainConfig, *layers, source=args.config or "command line")
    if args.resume and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such run directory")
    result = train(config, resume=args.resume, progress=not (args.quiet or args.json))
    if not (args.quiet or args.json) and result.run_dir:
        print(f"test accuracy {result.test_acc:.4f} after {result.epochs:g} epochs in {result.train_seconds:.2f} s "
              f"({result.samples_per_second:,.0f} samples/s on {result.device}, {result.precision}); "
              f"run saved to {result.run_dir}")
    return result.to_dict() if result.run_dir else None
