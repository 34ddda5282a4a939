"""Train an image classifier.

Examples:
  trainforge train                                   # the reference recipe: linear model on MNIST
  trainforge train --data fashion-mnist              # Fashion-MNIST's own default model and recipe
  trainforge train --data path/to/folder             # a model chosen from the folder's images (the choice is printed)
  trainforge train --data mnist --model cnn          # >= 99% on MNIST
  trainforge train --recipe speedrun                 # the fastest way to >= 99% on MNIST
  trainforge train --data path/to/folder --model resnet18 --image-size 64
  trainforge train --config runs/x/config.yaml       # re-run a saved run
  trainforge train --resume runs/x                   # continue an interrupted run
  trainforge train --nproc 2                         # 2 local processes (DDP); --batch-size stays the global batch
  trainforge train --nproc 2 --resume runs/x         # resume on any number of processes
  torchrun --nproc-per-node 8 -m trainforge train --model resnet18 --parallel fsdp   # what --nproc runs, by hand

Which model and recipe: an explicit --recipe wins; else the data set's recipe for the chosen model; else the
model's own recipe; else `reference`. Flags set after that override single fields. Without --model a built-in data
set trains its default model (`trainforge models` lists each set's default recipe with its measured accuracy and
time), and an image folder the small cnn from scratch or a fine-tuned EfficientNet-Lite0 (ImageNet weights,
offline), chosen from the images' size and channels and the images per class; the choice and its reason are
printed and the model is recorded in the run's config.yaml.

Several processes: `--nproc N` starts N processes on this machine through torch.distributed's elastic launcher
(torchrun); for several machines run torchrun on each, e.g. `torchrun --nnodes 2 --nproc-per-node 8
--rdzv-backend c10d --rdzv-endpoint host0:29400 -m trainforge train ...`. Only process 0 prints and writes the run
directory. If any process dies, or hangs for $TRAINFORGE_DIST_TIMEOUT seconds (default 60), the job ends with an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..errors import ConfigError
from . import budget, defaults


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file; flags given here override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train on N processes on this machine, started by torch.distributed's elastic launcher "
                             "(one per GPU on a GPU machine); --batch-size is the global batch, split across them")
    cfg.add_arguments(parser.add_argument_group("training options"), cfg.TrainConfig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import distributed
    from .loop import train

    config = _config(args)
    if args.resume and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such run directory")
    clock = budget.Clock.since_process_start()
    if config.time and config.model is None and config.recipe is None and not args.resume and args.nproc in (None, 1):
        return _measured_choice(args, config, clock)
    choice = None if args.resume else defaults.default_choice(config)
    if choice is not None:
        if not (args.quiet or args.json):
            print(choice.describe())
        if choice.pretrained:
            return _finetune(args, config, choice)
        config = _take_choice(args, config, choice)
    if args.nproc is not None and args.nproc != 1:
        _launch(args, config)
        return None
    with distributed.peer_failures_as_errors():
        try:
            result = train(config, resume=args.resume, progress=not (args.quiet or args.json), clock=clock)
        finally:
            distributed.teardown()
    if not (args.quiet or args.json) and result.run_dir:
        split = "validation" if config.holdout else "test"
        print(f"{split} accuracy {result.test_acc:.4f} after {result.epochs:g} epochs in {result.train_seconds:.2f} s "
              f"({result.samples_per_second:,.0f} samples/s on {result.device}, {result.precision}); "
              f"run saved to {result.run_dir}")
    return result.to_dict() if result.run_dir else None


def _config(args: argparse.Namespace) -> cfg.TrainConfig:
    """The run's config: the saved one of --config (if any) under the flags typed."""
    typed = cfg.typed_options(args, cfg.TrainConfig)
    budget.check_exclusive(typed)
    layers: list[dict[str, Any]] = []
    if args.config:
        if args.resume:
            raise ConfigError("--config and --resume exclude each other: a resumed run uses its saved config")
        saved = cfg.to_dict(cfg.load_file(cfg.TrainConfig, args.config))
        # A saved run's `out` says where that run went: re-running it writes a new run unless --out says otherwise.
        saved["out"], plan = None, saved.pop("time_plan")
        if saved["time"] is not None and saved["epochs"] is not None and "time" not in typed:
            if "epochs" not in typed and not (args.quiet or args.json):
                steps = f"{plan['steps']:,} steps, " if plan else ""
                print(f"{args.config}: re-running the {steps}{saved['epochs']:g} epochs its --time {saved['time']} "
                      f"resolved, not the time budget (pass --time to fill one again)")
            saved["time"] = None
        elif "time" in typed:
            saved["epochs"] = None  # the new budget sets them
        layers.append(saved)
    layers.append(typed)
    return cfg.merge(cfg.TrainConfig, *layers, source=args.config or "command line")


def _measured_choice(args: argparse.Namespace, config: cfg.TrainConfig, clock: budget.Clock) -> dict[str, Any] | None:
    """--time without --model: the candidates tried (trainforge/choose.py), the plan printed and saved in the run
    directory, and the winner trained for the rest of the budget."""
    from .. import runs
    from ..choose import PLAN_FILE, choose_model

    quiet = args.quiet or args.json
    plan = choose_model(config, clock, progress=not quiet)
    if not quiet:
        print(plan.table())
    winner = plan.winning()
    config = dataclasses.replace(config, out=config.out or str(runs.default_run_dir()), **winner.train_options())
    Path(config.out).mkdir(parents=True, exist_ok=True)
    plan.save(Path(config.out) / PLAN_FILE)
    if winner.kind == "prototypes":
        from ..fewshot.command import fewshot

        result = fewshot({"source": winner.model, "shots": [float(winner.shots)], "data": config.data, "data_dir": config.data_dir,
                          "image_size": winner.image_size, "seed": config.seed, "device": config.device,
                          "out": config.out}, progress=not quiet, clock=clock)
    elif winner.pretrained:
        from ..finetune.command import finetune

        given = {k: v for k, v in cfg.to_dict(config).items() if v != cfg.to_dict(cfg.TrainConfig())[k]}
        result = finetune({"source": winner.model, "strategy": winner.kind}, given, progress=not quiet, clock=clock)
    else:
        from .loop import train

        result = train(config, progress=not quiet, clock=clock).to_dict()
    if not quiet and result.get("run_dir"):
        print(f"{winner.name}: test accuracy {result['test_acc']:.4f}; run saved to {result['run_dir']}")
    return {**result, "plan": plan.to_dict()} if result.get("run_dir") else None


def _take_choice(args: argparse.Namespace, config: cfg.TrainConfig, choice: defaults.Choice) -> cfg.TrainConfig:
    """`config` with the chosen model, also set as if typed, so that config.yaml and every launched process carry
    the choice instead of making it again."""
    args.model = choice.model
    return dataclasses.replace(config, model=args.model)


def _finetune(args: argparse.Namespace, config: cfg.TrainConfig, choice: defaults.Choice) -> dict[str, Any] | None:
    """The pretrained path chosen for an image folder: `trainforge finetune --from SOURCE` with the options given."""
    from ..finetune.command import finetune

    if args.nproc is not None and args.nproc != 1:
        raise ConfigError(f"--nproc: fine-tuning {choice.model} for {config.data} runs in one process here; pass "
                          f"--model NAME to train from scratch on {args.nproc} processes")
    unset = cfg.to_dict(cfg.TrainConfig())
    # The fine-tuning defaults fill what the user left unset; the multi-process strategy does not apply.
    given = {k: v for k, v in cfg.to_dict(config).items() if v != unset[k] and k != "parallel"}
    result = finetune({"source": choice.model}, given, progress=not (args.quiet or args.json),
                      clock=budget.Clock.since_process_start())
    if result.get("run_dir") and not (args.quiet or args.json):
        print(f"test accuracy {result['test_acc']:.4f} after {result['epochs']:g} epochs of fine-tuning in "
              f"{result['train_seconds']:.2f} s; run saved to {result['run_dir']}")
    return result if result.get("run_dir") else None


def _launch(args: argparse.Namespace, config: cfg.TrainConfig) -> None:
    """Re-runs this command as `args.nproc` processes; rank 0 prints the progress and the --json line."""
    from . import distributed, recipes

    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1, got {args.nproc}")
    if distributed.env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc: this process was already started by torchrun; set the number of processes with "
                          "torchrun's --nproc-per-node instead")
    if not args.resume:
        resolved = recipes.resolve(config)
        if resolved.batch_size % args.nproc:
            raise ConfigError(f"--batch-size {resolved.batch_size} must be divisible by --nproc {args.nproc}")
    distributed.launch(args.nproc, worker_argv(args), debug=args.debug)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `trainforge` command line, without --nproc, that each launched process runs."""
    argv = ["train"]
    if args.config:
        argv += ["--config", args.config]
    if args.resume:
        argv += ["--resume", args.resume]
    for name, value in cfg.typed_options(args, cfg.TrainConfig).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    argv += [f"--{name}" for name in ("json", "quiet", "debug") if getattr(args, name, False)]
    return argv
