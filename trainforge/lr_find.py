"""Find a learning rate: the range test trains a copy of the model for a few steps while the rate grows
exponentially from 1e-7 to 10, plots the smoothed loss against it and suggests a tenth of the rate where the loss was
lowest. `train --lr auto` and `finetune --lr auto` run the same test and train at its suggestion.

Examples:
  trainforge lr-find                                   # the reference recipe's model and optimizer
  trainforge lr-find --recipe cnn --out lr.png --json
  trainforge lr-find --model resnet18 --data fashion-mnist --image-size 64 --steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from . import config as cfg
from . import runs


def configure(parser: argparse.ArgumentParser) -> None:
    from .train import lr_range

    parser.add_argument("--out", default="lr_find.png", metavar="PNG",
                        help="where to write the plot; the numbers go beside it as .json (default: lr_find.png)")
    parser.add_argument("--steps", type=int, default=lr_range.STEPS, help=f"steps of the test (default: "
                                                                          f"{lr_range.STEPS})")
    parser.add_argument("--start-lr", type=float, default=lr_range.START_LR, help="first learning rate tried")
    parser.add_argument("--end-lr", type=float, default=lr_range.END_LR, help="last learning rate tried")
    cfg.add_arguments(parser.add_argument_group("training options (what the rate is for)"), cfg.TrainConfig,
                      skip=("lr", "epochs", "time", "out", "tensorboard", "checkpoint_every", "checkpoint_minutes",
                            "target_acc", "parallel"))


def find_lr(config: cfg.TrainConfig, steps: int, start_lr: float, end_lr: float) -> Any:
    """The range test's result (train.lr_range.RangeTest) for the model, data and optimizer of `config`."""
    import torch

    from .data import make_train_loader
    from .errors import ConfigError
    from .hardware import memory
    from .train import lr_range, recipes
    from .train.device import resolve_device
    from .train.loop import Hooks, data_and_model

    if steps < 3 or not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find: expected --steps >= 3 and 0 < --start-lr < --end-lr, got {steps}, {start_lr}, "
                          f"{end_lr}")
    config = recipes.resolve(dataclasses.replace(config, lr=start_lr))
    if config.batch_size == "auto":
        raise ConfigError("lr-find: pass a number to --batch-size (the rate depends on it)")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    bundle, model, _, config = data_and_model(config, None, Hooks(), device,
                                              memory.budget(config.memory_budget, device)[0])
    loader = make_train_loader(bundle, config.batch_size, device=device, seed=config.seed, augment=config.augment,
                               workers=config.workers)
    try:
        return lr_range.range_test(model, loader, config, device, config.precision, steps, start_lr, end_lr)
    except ValueError as exc:
        raise ConfigError(f"lr-find: {exc}; lower --start-lr") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .train import lr_range

    config = cfg.merge(cfg.TrainConfig, cfg.typed_options(args, cfg.TrainConfig), source="command line")
    result = find_lr(config, args.steps, args.start_lr, args.end_lr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs.atomic_open(out) as handle:
        handle.write(lr_range.plot(result))
    runs.write_json(out.with_suffix(".json"), result.to_dict())
    if not (args.json or args.quiet):
        print(f"suggested learning rate {result.suggestion:.3g}: {result.reason}; plot in {out}")
    return {"suggestion": result.suggestion, "reason": result.reason, "plot": str(out),
            "steps": len(result.lrs)}
