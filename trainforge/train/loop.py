"""The training loop, top to bottom: `train()` runs setup -> (train_one_epoch -> end_epoch)* -> finish; `step()` is
one optimizer step.

Speed comes from what is *not* here: data stay on the device as uint8 (normalization is the model's first layer),
there is no per-sample Python, the loss is read back to the host only where a decision needs it, and evaluation
runs in large batches under `inference_mode`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import config as cfg
from .. import runs
from ..data import DataBundle, eval_batches, load_data, make_train_loader
from ..data.loaders import CachedRows, balanced_subset, holdout_split
from ..errors import ConfigError, TrainingError
from ..hardware import memory
from ..models import build_classifier
from ..models.registry import effective_width
from . import budget, checkpoint, distributed, layout, plan, recipes
from .device import autocast, configure_backends, configure_host_allocator, resolve_device, synchronize
from .monitor import Monitor
from .progress import ProgressReporter

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Fault injection for the recovery tests: "step=N" raises torch.OutOfMemoryError in optimizer step N (counted from 1),
# "eval=N" in the N-th evaluation; once each per process, or only on process R with "step=N@R".
OOM_ENV = "TRAINFORGE_TEST_OOM"


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports (also written to `summary.json`)."""

    test_acc: float
    test_loss: float
    train_loss: float
    epochs: float
    steps: int
    train_seconds: float
    samples_per_second: float
    device: str
    precision: str
    world_size: int
    run_dir: str | None
    nonfinite_skips: int = 0
    stopped_early: bool = False
    accumulate: int = 1  # micro-batches per optimizer step at the end
    eval_batch_size: int = plan.EVAL_CAP
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Hooks:
    """What another verb (finetune, compress, tune) replaces in the loop; None keeps the loop's own."""

    model: nn.Module | None = None  # instead of the registry's model; takes raw uint8 images
    model_info: runs.ModelInfo | None = None  # how `runs.load()` rebuilds `model`
    param_groups: Callable[[nn.Module], list[dict]] | None = None  # optimizer groups, e.g. a slower backbone
    loss_fn: LossFn | None = None  # loss_fn(logits, labels, images) instead of cross-entropy
    on_epoch: Callable[[dict[str, Any]], bool] | None = None  # sees each epoch's record; True stops the run


@dataclasses.dataclass
class TrainState:
    """Where a run is; a checkpoint saves it and `--resume` restores it."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps (taken or skipped) in the current epoch
    step: int = 0  # optimizer steps in all
    elapsed: float = 0.0  # training seconds of earlier processes of this run
    skips: int = 0  # steps skipped for a non-finite loss or gradients
    loss_sum: float = 0.0  # this epoch's summed step losses, as far as moved to the host
    loss_count: int = 0  # steps summed into loss_sum
    accumulate: int = 0  # micro-batches per step since an out-of-memory recovery; 0: as planned
    total_steps: int = 0  # the steps a time budget planned last; 0: as the config's epochs say
    budget_spent: float = 0.0  # seconds of a time budget used by earlier processes of this run
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one record per finished epoch

    def counters(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "metrics"}


@dataclasses.dataclass
class StepParts:
    """What one optimizer step touches."""

    model: nn.Module  # owns the parameters
    step_model: nn.Module  # what the forward pass calls: `model`, maybe DDP/FSDP-wrapped and compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scaler: torch.amp.GradScaler | None
    criterion: LossFn
    device: torch.device
    precision: str
    skip_nonfinite: bool = False
    accumulate: int = 1  # micro-batches per optimizer step
    agree: bool = False  # DDP processes: settle out-of-memory errors together before averaging (see _agreed_step)


@dataclasses.dataclass
class Run:
    """One run's parts, built by `setup()`."""

    config: cfg.TrainConfig
    hooks: Hooks
    parts: StepParts
    loader: Any
    test_images: torch.Tensor
    test_labels: torch.Tensor
    n_train: int  # training images, also of a streamed set whose images stay on disk
    steps_per_epoch: int
    total_steps: int
    rank: int
    world: int
    run_dir: Path
    checkpointer: checkpoint.Checkpointer
    reporter: ProgressReporter
    monitor: Monitor
    writer: Any
    state: TrainState
    lock: runs.RunLock | None = None  # rank 0's claim on run_dir, held until the run's last file is written
    check_every: int = 1  # steps between host reads of the loss
    started: float = 0.0
    stopped_early: bool = False
    eval_batch_size: int = plan.EVAL_CAP
    recoveries: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # this epoch's, for metrics.jsonl
    filler: budget.Filler | None = None  # plans the steps of a --time run
    faults: dict[str, int] = dataclasses.field(default_factory=dict)  # OOM_ENV's, not yet raised
    evaluations: int = 0

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def save(self, epoch_end: bool = False) -> None:
        p = self.parts
        if self.filler is not None:
            self.state.budget_spent, self.state.total_steps = self.filler.spent(), self.total_steps
        self.checkpointer.save(p.model, p.optimizer, p.scheduler, p.scaler, self.state.counters(), self.state.metrics,
                               epoch_end=epoch_end)

    def start(self) -> None:
        synchronize(self.parts.device)
        self.started = time.perf_counter() - self.state.elapsed
        self.reporter.start(self.state.step)
        self.monitor.start()

    def close(self) -> None:
        self.reporter.close()
        self.monitor.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()


def train(config: cfg.TrainConfig | dict | None = None, *, resume: str | os.PathLike | None = None,
          data: DataBundle | None = None, hooks: Hooks | None = None, progress: bool = True,
          clock: budget.Clock | None = None) -> TrainResult:
    """Trains a model as `config` says and writes a run directory; returns the final metrics.

    `resume` continues the run in that directory from its last checkpoint (its saved config wins, except for
    fields passed explicitly in `config`); `data` replaces loading `config.data`; `hooks` let other verbs reuse
    this loop. With `config.time` the run fills that budget (budget.py), timed by `clock` (default: from this call).
    """
    if isinstance(config, dict):
        config = cfg.from_dict(cfg.TrainConfig, config)
    config = config or cfg.TrainConfig()
    clock = clock or budget.Clock()
    if clock.start is None:
        clock.start = clock.now()
    saved: dict[str, Any] | None = None
    if resume is not None:
        config, saved = checkpoint.load_resume(Path(resume), config)
    # Epochs a user (or a saved config, or a tune trial) gives are trained as given; a recipe's scale to the data.
    scale = config.epochs is None and config.time is None
    run = setup(recipes.resolve(config), data, hooks or Hooks(), saved, progress, resuming=resume is not None,
                scale_epochs=scale, clock=clock)
    run.start()
    try:
        if run.filler is not None:
            run.filler.check_start(run.config.model)
        while run.state.epoch < run.num_epochs:
            epoch_start = time.perf_counter()
            steps, train_seconds = train_one_epoch(run)
            if end_epoch(run, steps, train_seconds, epoch_start):
                break
        return finish(run)
    finally:
        run.close()


def setup(config: cfg.TrainConfig, data: DataBundle | None, hooks: Hooks, saved: dict[str, Any] | None,
          progress: bool, resuming: bool = False, scale_epochs: bool = False,
          clock: budget.Clock | None = None) -> Run:
    """Device, data, model, memory plan, optimizer, run directory and (when resuming) the saved state, in that
    order; every automatic choice is written into the run's config.yaml and said in one line. `scale_epochs`: the
    recipe's epochs scale to the data (recipes.scale_to_data)."""
    device = resolve_device(config.device)
    rank, world = distributed.setup(device)
    if config.time is not None and world > 1:
        raise ConfigError(f"--time {config.time} plans the steps of one process; several processes take --epochs")
    configure_backends(device)
    configure_host_allocator()
    torch.manual_seed(config.seed)
    budget = memory.budget(config.memory_budget, device)
    bundle, model, info, config = data_and_model(config, data, hooks, device, budget[0], world,
                                                 progress=progress and rank == 0)
    precision = config.precision
    test_images, test_labels = bundle.test.images.to(device), bundle.test.labels.to(device)
    config, memory_plan, notes = _plan(config, bundle, model, device, precision, world, budget)
    loader = make_train_loader(bundle, config.batch_size, device=device, seed=config.seed, augment=config.augment,
                               workers=config.workers, rank=rank, world_size=world)
    config = _late_choices(config, model, loader, device, precision, len(bundle.train.labels), notes, scale_epochs)
    if progress and rank == 0:
        print("\n".join(notes), file=sys.stderr)
    total_steps = _first_steps(config, len(loader), len(bundle.train.labels))
    # Counts the FLOPs per sample now, while `model` is still whole (FSDP shards it below).
    monitor = Monitor(model, test_images[:1], device, precision, world_size=world, sample_gpu=rank == 0)
    parts = _step_parts(config, model, hooks, device, precision, world, total_steps)
    parts.accumulate = memory_plan.accumulate
    run_dir, lock = _claim_run_dir(config, info, rank, resuming)
    try:
        state = _restore(saved, model, parts, device)
        if state.total_steps:
            total_steps = state.total_steps
        if config.compile:
            parts.step_model = torch.compile(parts.step_model)
        checkpointer = checkpoint.Checkpointer(run_dir, config, rank == 0, state.step if saved is not None else None,
                                               device=device, world=world)
        return Run(config=config, hooks=hooks, parts=parts, loader=loader, test_images=test_images,
                   test_labels=test_labels, n_train=len(bundle.train.labels), steps_per_epoch=len(loader),
                   total_steps=total_steps, rank=rank, world=world, run_dir=run_dir, monitor=monitor,
                   checkpointer=checkpointer, lock=lock, state=state,
                   reporter=ProgressReporter(enabled=progress and rank == 0, total_steps=total_steps,
                                             samples_per_step=config.batch_size),
                   writer=_tensorboard(run_dir, state.step) if rank == 0 and config.tensorboard else None,
                   # On the CPU a host read of the loss costs nothing, so every step is checked; on a GPU it would
                   # stall the pipeline, so the loss is summed on the device and read at a few points per epoch.
                   check_every=1 if device.type == "cpu" or config.skip_nonfinite else max(1, len(loader) // 8),
                   eval_batch_size=memory_plan.eval_batch_size, faults=_faults(rank),
                   filler=_filler(config, clock, state, len(loader), len(test_labels),
                                  len(bundle.train.labels)))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _late_choices(config: cfg.TrainConfig, model: nn.Module, loader: Any, device: torch.device, precision: str,
                  n_train: int, notes: list[str], scale_epochs: bool) -> cfg.TrainConfig:
    """The choices made once the loader exists: --lr auto (a range test on it) and a recipe's epochs scaled to the
    data, each adding its line to `notes`."""
    if config.lr == "auto":
        from .lr_range import auto_lr

        config, note = auto_lr(config, model, loader, device, precision)
        notes.append(note)
    if scale_epochs:
        config, note = recipes.scale_to_data(config, n_train)
        notes += [note] if note else []
    return config


def _restore(saved: dict[str, Any] | None, model: nn.Module, parts: StepParts, device: torch.device) -> TrainState:
    """A fresh state, or (resuming) the saved counters and metrics, the optimizer and schedule restored into
    `parts`."""
    if saved is None:
        return TrainState()
    checkpoint.restore(saved, model, parts.optimizer, parts.scheduler, parts.scaler, device)
    state = TrainState(**checkpoint.counters(saved), metrics=list(saved["metrics"]))
    parts.accumulate = max(parts.accumulate, state.accumulate)
    return state


def _filler(config: cfg.TrainConfig, clock: budget.Clock | None, state: TrainState, steps_per_epoch: int,
            test_images: int, train_images: int) -> budget.Filler | None:
    """What plans the steps of a --time run (None without one), up to _step_cap."""
    if config.time is None:
        return None
    per_epoch = min(config.eval_subset or test_images, test_images)
    return budget.Filler(config.time, clock or budget.Clock(), steps_per_epoch=steps_per_epoch,
                         batch_size=config.batch_size, eval_images=per_epoch, final_eval_images=test_images,
                         spent_before=state.budget_spent,
                         max_steps=_step_cap(config, steps_per_epoch, train_images))


def _recipe_steps(config: cfg.TrainConfig) -> int:
    """The optimizer steps of the run's recipe on the images recipes are tuned on (0 without a recipe)."""
    if config.recipe not in recipes.RECIPES:
        return 0
    return math.ceil(recipes.recipe_steps(recipes.recipe_value(config.recipe, "epochs"), config.batch_size))


def _step_cap(config: cfg.TrainConfig, steps_per_epoch: int, train_images: int) -> int | None:
    """How far a time budget may fill a set smaller than the recipes' own: a scaled recipe's most epochs or the
    recipe's own steps, whichever is more. A linear probe on 2,700 photos' features filled 573 epochs and lost 5
    points of held-out accuracy to its 55-epoch trial (RESULTS.md, "auto")."""
    if train_images >= recipes.RECIPE_IMAGES:
        return None
    return max(recipes.MAX_SCALED_EPOCHS * steps_per_epoch, _recipe_steps(config))


def _first_steps(config: cfg.TrainConfig, steps_per_epoch: int, train_images: int) -> int:
    """The schedule's length before anything is timed: the epochs' steps, or under --time at least the recipe's own
    steps (within _step_cap), so the schedule is still warming up when the budget first plans the run. Planned
    from 2 steps (1.5 epochs of 50 images), it had annealed to lr/25,000 before the first plan and stayed there:
    0.52 held-out accuracy against 0.83 for the same steps under --epochs."""
    # The tolerance keeps epochs recorded as steps / steps per epoch (a time budget's) at exactly those steps.
    steps = max(1, math.ceil(config.epochs * steps_per_epoch - 1e-6))
    if config.time is None:
        return steps
    guess = _recipe_steps(config)
    cap = _step_cap(config, steps_per_epoch, train_images)
    return max(steps, guess if cap is None else min(guess, cap))


def _fill(run: Run) -> None:
    """Plans the run's steps again when the budget's filler says so, stretching what is left of the schedule."""
    filler, state = run.filler, run.state
    filler.timed(state.step)
    if not filler.due(state.step, run.total_steps):
        return
    if filler.eval_image_seconds is None:
        # Up to an evaluation batch (at most 4 training batches): smaller ones cost more per image than the whole.
        n = min(len(run.test_labels), run.eval_batch_size, 4 * run.config.batch_size)

        def evaluate() -> None:
            eval_totals(run.parts.model, run.test_images[:n], run.test_labels[:n], run.eval_batch_size,
                        run.parts.device, run.config.eval_precision)
            synchronize(run.parts.device)
        filler.time_evaluation(evaluate, n)
    total = filler.plan(state.step)
    error = filler.too_small(state.step, total, run.config.model)
    if error is not None:
        raise error
    if filler.plans == 1 and run.rank == 0 and run.reporter.enabled:
        print(filler.describe(total), file=sys.stderr)
    if total == run.total_steps:
        return
    scheduler = run.parts.scheduler
    scheduler.lr_lambdas[0].stretch(state.step, total)
    for group, base, fn in zip(run.parts.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(state.step)  # the next step's rate, on the new plan
    run.total_steps = run.reporter.total_steps = total
    if filler.plans == 1:
        _write_config(run)


def _write_config(run: Run) -> None:
    """Rewrites config.yaml with what a --time run resolved: its epochs and the budget's record (time_plan)."""
    filler = run.filler
    run.config = dataclasses.replace(run.config, epochs=run.total_steps / run.steps_per_epoch,
                                     time_plan=filler.record(run.total_steps))
    if run.rank == 0:
        runs.write_text(run.run_dir / runs.CONFIG_FILE, cfg.dumps(run.config))


def _claim_run_dir(config: cfg.TrainConfig, info: runs.ModelInfo, rank: int,
                   resuming: bool) -> tuple[Path, runs.RunLock | None]:
    """The run directory, claimed by rank 0 (which alone writes it) and holding the config and model description."""
    run_dir = Path(config.out) if config.out else runs.default_run_dir()
    if rank != 0:
        return run_dir, None
    lock = runs.prepare_run_dir(run_dir, overwrite=config.overwrite, resuming=resuming)
    try:
        runs.write_text(run_dir / runs.CONFIG_FILE, cfg.dumps(dataclasses.replace(config, out=str(run_dir))))
        runs.write_json(run_dir / runs.MODEL_INFO, dataclasses.asdict(info))
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def data_and_model(config: cfg.TrainConfig, data: DataBundle | None, hooks: Hooks, device: torch.device,
                   memory_budget: int | None = None, world: int = 1,
                   progress: bool = False) -> tuple[DataBundle, nn.Module, runs.ModelInfo, cfg.TrainConfig]:
    """The run's data (resident when it fits RESIDENT_SHARE of `memory_budget`), the model on `device` in its
    layout, how to rebuild it, and `config` with the layout and precision chosen for this model and device
    (recorded in the run, so that a re-run takes the same).

    The model takes the data's images at their own size and resizes them to --image-size inside itself (a
    built-in set stays 28 px uint8 in memory)."""
    bundle = data or load_data(config.data, config.data_dir, subset=config.subset, seed=config.seed,
                               image_size=config.image_size, val_fraction=config.val_fraction, loader=config.loader,
                               memory_budget=memory_budget, progress=progress)
    if config.holdout:
        bundle = holdout_split(bundle, config.val_fraction, config.seed)
    model = hooks.model
    image_size = config.image_size or bundle.image_size
    if model is None:
        model = build_classifier(config.model, len(bundle.classes), bundle.in_channels, image_size,
                                 bundle.mean, bundle.std, width=config.width)
    info = hooks.model_info or runs.ModelInfo(
        model=config.model, num_classes=len(bundle.classes), classes=list(bundle.classes),
        in_channels=bundle.in_channels, image_size=image_size, mean=list(bundle.mean), std=list(bundle.std),
        width=effective_width(config.model, config.width))
    precision = layout.choose_precision(config.precision, model, device)
    sharded = world > 1 and config.parallel == "fsdp"
    chosen = dataclasses.replace(config, layout=layout.choose_layout(config.layout, model, device, sharded),
                                 precision=precision,
                                 eval_precision=layout.choose_eval_precision(config.eval_precision, precision, device))
    return bundle, layout.apply_layout(model.to(device), chosen.layout), info, chosen


def _plan(config: cfg.TrainConfig, bundle: DataBundle, model: nn.Module, device: torch.device, precision: str,
          world: int, budget: tuple[int, str]) -> tuple[cfg.TrainConfig, plan.MemoryPlan, list[str]]:
    """The memory plan and --batch-size auto (with the learning rate that follows it): `config` with the choices
    filled in, and a line on each."""
    probe_images, probe_labels = bundle.test.images[:plan.PROBE_SIZES[-1]], bundle.test.labels[:plan.PROBE_SIZES[-1]]
    cost = plan.measure(model, probe_images, probe_labels, device, precision, eval_precision=config.eval_precision)
    state, in_use = plan.state_bytes(model, config.optimizer, config.momentum), memory.in_use_bytes(device)
    notes = [f"data: {bundle.note}"] if bundle.note else []
    if device.type == "cuda" and bundle.stream is None:
        in_use += bundle.train.images.numel()  # the loader moves them onto the GPU after planning
    if config.batch_size == "auto":
        if world > 1:
            raise ConfigError("--batch-size auto runs on one process; pass the size it chose there to --nproc runs")
        largest = plan.max_micro_batch(cost, budget[0], in_use, state)
        size, why = plan.auto_batch_size(model, probe_images, probe_labels, device, precision, largest,
                                         len(bundle.train.labels))
        base = recipes.recipe_value(config.recipe, "batch_size")
        rule = config.lr_scaling or ("linear" if config.optimizer == "sgd" else "sqrt")
        lr = config.lr if config.lr == "auto" else plan.scaled_lr(config.lr, rule, size, base)
        notes.append(f"batch size auto: {size}, {why}; learning rate {config.lr} at the recipe's batch of {base} -> "
                     f"{lr if isinstance(lr, str) else f'{lr:.4g}'} by {rule} scaling")
        config = dataclasses.replace(config, batch_size=size, lr=lr, lr_scaling=rule)
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")
    memory_plan = plan.fit(cost, budget[0], budget[1], in_use, state, math.ceil(config.batch_size / world),
                           config.accumulate, config.eval_batch_size, device)
    streamed = bundle.stream is not None
    notes.append(f"{memory_plan.describe()}; training images {_residency(bundle)}")
    config = dataclasses.replace(config, accumulate=memory_plan.accumulate, eval_batch_size=memory_plan.eval_batch_size,
                                 memory_budget=f"{math.ceil(budget[0] / 2 ** 20)}M",
                                 loader="streaming" if streamed else "device")
    return config, memory_plan, notes


def _residency(bundle: DataBundle) -> str:
    """Where the training images live, and whether the plan counts them."""
    if isinstance(bundle.stream, CachedRows):
        return ("gathered batch by batch from the memory-mapped decoded cache (file-backed pages the kernel can "
                "reclaim: not counted)")
    if bundle.stream is not None:
        return "decoded from disk batch by batch"
    return "resident (counted)"


def _faults(rank: int) -> dict[str, int]:
    """OOM_ENV parsed for process `rank`: {"step": N, "eval": N}."""
    faults = {}
    for part in filter(None, os.environ.get(OOM_ENV, "").split(",")):
        kind, _, at = part.partition("=")
        at, _, on = at.partition("@")
        if not on or int(on) == rank:
            faults[kind.strip()] = int(at)
    return faults


def _step_parts(config: cfg.TrainConfig, model: nn.Module, hooks: Hooks, device: torch.device, precision: str,
                world: int, total_steps: int) -> StepParts:
    # DDP, or FSDP sharding `model` in place; before the optimizer is built, as FSDP replaces the parameters.
    step_model = distributed.wrap(model, config.parallel, device, world)
    groups = (hooks.param_groups(model) if hooks.param_groups
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    optimizer = make_optimizer(config, groups, device)
    return StepParts(model=model, step_model=step_model, optimizer=optimizer,
                     scheduler=make_scheduler(config, optimizer, total_steps),
                     scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
                     criterion=hooks.loss_fn or cross_entropy_loss(config.label_smoothing), device=device,
                     precision=precision, skip_nonfinite=config.skip_nonfinite,
                     agree=world > 1 and config.parallel == "ddp")


def step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor,
         loss_weight: float | None = None) -> torch.Tensor | None:
    """One optimizer step on a batch: the detached loss, or None when it was skipped for a non-finite loss or
    gradients (`skip_nonfinite`), in which case the schedule still advances so the run keeps its planned length.

    `loss_weight` scales the loss of a process's share of a multi-process batch (see distributed.loss_weight).
    With `parts.accumulate` > 1 the batch is split into that many micro-batches (see _accumulated_step).
    """
    if parts.agree:
        return _agreed_step(parts, images, labels, loss_weight)
    if parts.accumulate > 1:
        return _accumulated_step(parts, images, labels, loss_weight)
    with autocast(parts.device, parts.precision):
        logits = parts.step_model(images)
        loss = parts.criterion(logits.float(), labels, images)
    if loss_weight is not None:
        loss = loss * loss_weight
    parts.optimizer.zero_grad(set_to_none=True)
    # Summed over ranks, so that all of them skip (or not) together.
    if parts.skip_nonfinite and not _finite(distributed.all_reduce_sum(loss.detach().clone())):
        return _skipped(parts)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        loss.backward()
        if parts.skip_nonfinite and not _grads_finite(parts.model):
            parts.optimizer.zero_grad(set_to_none=True)
            return _skipped(parts)
        parts.optimizer.step()
    if parts.scheduler is not None:
        parts.scheduler.step()
    return loss.detach()


def _accumulated_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor,
                      loss_weight: float | None) -> torch.Tensor | None:
    """step() over `parts.accumulate` micro-batches; FSDP processes synchronize the gradients in the last one's
    backward pass."""
    parts.optimizer.zero_grad(set_to_none=True)
    total = _micro_batches(parts, images, labels, loss_weight, sync_last=True)
    finite = not parts.skip_nonfinite or _finite(distributed.all_reduce_sum(total.clone()))
    return _optimizer_step(parts, total, finite)


def _agreed_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, loss_weight: float | None,
                 inject: bool = False) -> torch.Tensor | None:
    """step() for DDP processes: each computes its micro-batches' gradients without synchronizing, then one
    all-reduce tells every process whether any ran out of memory, so that all raise it together (and retry with
    more micro-batches) instead of some waiting forever in a gradient all-reduce the failed one never enters.
    The gradients are then averaged in one pass after the backward, not overlapped with it: that is the price of
    the agreement point. `inject` raises the error in this process (OOM_ENV)."""
    parts.optimizer.zero_grad(set_to_none=True)
    failed = False
    try:
        if inject:
            raise torch.OutOfMemoryError("injected by " + OOM_ENV)
        total = _micro_batches(parts, images, labels, loss_weight, sync_last=False)
    except torch.OutOfMemoryError:
        parts.optimizer.zero_grad(set_to_none=True)
        total, failed = torch.zeros((), device=parts.device), True
    summed, failed_ranks = distributed.agree(total, failed)
    if failed_ranks:
        parts.optimizer.zero_grad(set_to_none=True)
        raise _out_of_memory_on(failed_ranks)
    distributed.average_gradients(parts.model)
    distributed.broadcast_buffers(parts.model)  # DDP would have done it before the next forward pass
    return _optimizer_step(parts, total, _finite(summed))


def _micro_batches(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, loss_weight: float | None,
                   sync_last: bool) -> torch.Tensor:
    """Forward and backward passes over `parts.accumulate` micro-batches, each one's loss weighted by its share of
    the batch so that the gradients add up to the whole batch's; returns the summed loss. DDP synchronizes the
    gradients only in the last backward pass when `sync_last`, else in none."""
    chunks = [c for c in zip(images.tensor_split(parts.accumulate), labels.tensor_split(parts.accumulate)) if len(c[1])]
    no_sync = getattr(parts.step_model, "no_sync", None)
    total = torch.zeros((), device=parts.device)
    for i, (x, y) in enumerate(chunks):
        share = len(y) / len(labels) * (1.0 if loss_weight is None else loss_weight)
        local = no_sync is not None and (i < len(chunks) - 1 or not sync_last)
        with no_sync() if local else contextlib.nullcontext():
            with autocast(parts.device, parts.precision):
                loss = parts.criterion(parts.step_model(x).float(), y, x) * share
            (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()
        total += loss.detach()
        del loss  # frees this micro-batch's graph before the next one's forward pass
    return total


def _optimizer_step(parts: StepParts, total: torch.Tensor, finite: bool) -> torch.Tensor | None:
    """The optimizer and schedule step after the gradients are in, or a skip (`skip_nonfinite`)."""
    if parts.skip_nonfinite and not (finite and (parts.scaler is not None or _grads_finite(parts.model))):
        parts.optimizer.zero_grad(set_to_none=True)
        return _skipped(parts)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    if parts.scheduler is not None:
        parts.scheduler.step()
    return total


def _recovering_step(run: Run, images: torch.Tensor, labels: torch.Tensor,
                     weight: float | None) -> torch.Tensor | None:
    """step(), retried with twice the micro-batches after each out-of-memory error: the global batch, the
    schedule and the result stay the same."""
    while True:
        try:
            if run.faults.get("step") == run.state.step + 1:
                del run.faults["step"]
                if run.parts.agree:
                    return _agreed_step(run.parts, images, labels, weight, inject=True)
                raise torch.OutOfMemoryError("injected by " + OOM_ENV)
            return step(run.parts, images, labels, weight)
        except torch.OutOfMemoryError as exc:
            _recover(run, len(labels), exc)


def _recover(run: Run, batch: int, exc: torch.OutOfMemoryError) -> None:
    parts, step_number = run.parts, run.state.step + 1
    parts.optimizer.zero_grad(set_to_none=True)  # what the failed step held
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
    if run.world > 1 and not parts.agree:
        # FSDP gathers and reduces inside the passes: the other processes wait there and cannot be told to switch.
        raise TrainingError(f"out of memory at step {step_number} on process {run.rank} ({exc}); re-run with "
                            f"--accumulate {2 * parts.accumulate}") from exc
    if parts.accumulate >= batch:
        raise TrainingError(f"out of memory at step {step_number} with micro-batches of 1 sample ({exc}); lower "
                            f"--image-size, pick a smaller model or free memory on {parts.device}") from exc
    parts.accumulate = min(batch, 2 * parts.accumulate)
    run.state.accumulate = parts.accumulate
    micro = math.ceil(batch / parts.accumulate)
    run.recoveries.append({"step": step_number, "accumulate": parts.accumulate, "micro_batch": micro})
    if run.rank == 0:
        print(f"{_oom_said(run, exc)} at step {step_number}: {parts.accumulate} micro-batches of {micro} per step "
              f"from now on (the batch of {batch} and the schedule stay the same)", file=sys.stderr)


def _out_of_memory_on(ranks: list[int]) -> torch.OutOfMemoryError:
    """The error every DDP process raises when `ranks` ran out of memory (see _agreed_step)."""
    return torch.OutOfMemoryError(f"out of memory on process {', '.join(map(str, ranks))}")


def _oom_said(run: Run, exc: torch.OutOfMemoryError) -> str:
    """How a recovery line names the error: which processes, or plainly (not the allocator's whole message)."""
    return str(exc) if run.world > 1 else "out of memory"


def _recovering_evaluate(run: Run, subset: torch.Tensor | None = None) -> tuple[float, float]:
    """_evaluate_run() in the run's evaluation batches, halved after each out-of-memory error."""
    run.evaluations += 1
    while True:
        try:
            inject = run.faults.get("eval") == run.evaluations
            if inject:
                del run.faults["eval"]
            return _evaluate_run(run, subset, inject)
        except torch.OutOfMemoryError as exc:
            if (run.world > 1 and not run.parts.agree) or run.eval_batch_size == 1:
                raise TrainingError(f"out of memory evaluating in batches of {run.eval_batch_size} ({exc}); pass "
                                    f"a smaller --eval-batch-size or --memory-budget") from exc
            if run.parts.device.type == "cuda":
                torch.cuda.empty_cache()
            run.eval_batch_size //= 2
            run.recoveries.append({"evaluation": run.evaluations, "eval_batch_size": run.eval_batch_size})
            if run.rank == 0:
                print(f"{_oom_said(run, exc)} evaluating: evaluation batches of {run.eval_batch_size} from now on",
                      file=sys.stderr)


def _skipped(parts: StepParts) -> None:
    if parts.scheduler is not None:
        parts.scheduler.step()
    return None


def train_one_epoch(run: Run) -> tuple[int, float]:
    """Trains the rest of epoch `run.state.epoch`; returns the steps it took and the seconds they took."""
    state, config = run.state, run.config
    run.parts.model.train()
    first_step = state.step_in_epoch
    run.loader.set_epoch(state.epoch, first_step)
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=run.parts.device, dtype=torch.float64)
    for i, (images, labels) in enumerate(run.loader, start=first_step):
        if state.step >= run.total_steps:  # a time budget may move the end while the epoch runs
            break
        weight = None
        if run.world > 1:
            global_count = min(config.batch_size, run.n_train - i * config.batch_size)
            weight = distributed.loss_weight(len(labels), global_count, run.world)
        loss = _recovering_step(run, images, labels, weight)
        state.step, state.step_in_epoch = state.step + 1, i + 1
        if loss is None:
            state.skips += 1
            continue
        loss_sum += loss
        state.loss_count += 1
        checkpoint_due = run.checkpointer.due(state.step)
        if (i + 1) % run.check_every == 0 or checkpoint_due:
            _flush_loss(run, loss_sum)
            if run.filler is not None:
                _fill(run)
        run.reporter.step(state.step)
        if checkpoint_due:
            state.elapsed = time.perf_counter() - run.started
            run.save()
    _flush_loss(run, loss_sum)  # also synchronizes the device, so the time below is the steps'
    return state.step_in_epoch - first_step, time.perf_counter() - started


def end_epoch(run: Run, steps: int, train_seconds: float, epoch_start: float) -> bool:
    """Evaluates, records and checkpoints the epoch just trained; True when the run should stop here."""
    state, config = run.state, run.config
    train_loss = state.loss_sum / max(1, state.loss_count)
    subset = None if state.epoch + 1 >= run.num_epochs else _eval_subset(run)
    if run.filler is not None:
        run.filler.epoch_end()
    test_acc, test_loss = _recovering_evaluate(run, subset)
    synchronize(run.parts.device)
    if run.filler is not None:
        run.filler.evaluated(len(run.test_labels) if subset is None else len(subset))
    epoch_seconds = time.perf_counter() - epoch_start
    state.epoch, state.step_in_epoch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
    state.elapsed = time.perf_counter() - run.started
    record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss, "test_loss": test_loss,
              "test_acc": test_acc, "lr": run.parts.optimizer.param_groups[-1]["lr"], "epoch_seconds": epoch_seconds,
              "samples_per_second": steps * config.batch_size / epoch_seconds, "elapsed_seconds": state.elapsed,
              "eval_subset": None if subset is None else len(subset)}
    record.update(run.monitor.epoch_stats(steps * config.batch_size, train_seconds))
    record.update(accumulate=run.parts.accumulate, eval_batch_size=run.eval_batch_size,
                  **memory.peak_bytes(run.parts.device))
    if run.recoveries:
        record["oom_recoveries"], run.recoveries = run.recoveries, []
    state.metrics.append(record)
    run.reporter.epoch_done(record)
    if run.writer is not None:
        for key, value in record.items():
            if key not in ("epoch", "step") and value is not None:
                run.writer.add_scalar(key, value, state.step)
        run.writer.flush()
    stop = config.target_acc is not None and test_acc >= config.target_acc
    stop = bool(run.hooks.on_epoch is not None and run.hooks.on_epoch(record)) or stop
    if stop and subset is not None:  # the run ends here: its reported accuracy is the whole test set's
        record["test_acc"], record["test_loss"] = _recovering_evaluate(run)
        record["eval_subset"] = None
    run.save(epoch_end=True)
    if run.filler is not None:
        run.filler.saved(state.step)
    run.stopped_early = stop and state.step < run.total_steps
    return stop


def _eval_subset(run: Run) -> torch.Tensor | None:
    """Indices of the seeded, class-balanced test images evaluated after an epoch (None: all of them)."""
    n = run.config.eval_subset
    if n is None or n >= len(run.test_labels):
        return None
    return balanced_subset(run.test_labels.cpu(), n, run.config.seed).to(run.test_labels.device)


def _evaluate_run(run: Run, subset: torch.Tensor | None, inject: bool = False) -> tuple[float, float]:
    """evaluate(); DDP processes agree on an out-of-memory error so that all raise it (see _agreed_step), and
    `inject` raises one in this process (OOM_ENV)."""
    images, labels = run.test_images, run.test_labels
    if subset is not None:
        images, labels = images[subset], labels[subset]
    failed = False
    try:
        if inject:
            raise torch.OutOfMemoryError("injected by " + OOM_ENV)
        totals = eval_totals(run.parts.model, images, labels, run.eval_batch_size, run.parts.device,
                             run.config.eval_precision, run.rank, run.world)
    except torch.OutOfMemoryError:
        if not run.parts.agree:
            raise
        totals, failed = torch.zeros(3, device=run.parts.device, dtype=torch.float64), True
    totals, failed_ranks = distributed.agree(totals, failed)
    if failed_ranks:
        raise _out_of_memory_on(failed_ranks)
    return _ratios(totals)


def finish(run: Run) -> TrainResult:
    """The result; the final weights and summary written by rank 0."""
    state, last = run.state, run.state.metrics[-1] if run.state.metrics else {}
    train_seconds = time.perf_counter() - run.started
    result = TrainResult(
        test_acc=last.get("test_acc", math.nan), test_loss=last.get("test_loss", math.nan),
        train_loss=last.get("train_loss", math.nan), epochs=state.step / run.steps_per_epoch, steps=state.step,
        train_seconds=train_seconds,
        samples_per_second=state.step * run.config.batch_size / train_seconds if train_seconds > 0 else 0.0,
        device=str(run.parts.device), precision=run.parts.precision, world_size=run.world,
        run_dir=str(run.run_dir) if run.rank == 0 else None, nonfinite_skips=state.skips,
        stopped_early=run.stopped_early, accumulate=run.parts.accumulate, eval_batch_size=run.eval_batch_size,
        **memory.peak_bytes(run.parts.device))
    final_state = distributed.model_state(run.parts.model)  # a collective under FSDP
    if run.filler is not None:
        _write_config(run)
    if run.rank == 0:
        runs.save_weights(run.run_dir / runs.MODEL_FILE, final_state)
        runs.write_json(run.run_dir / runs.SUMMARY_FILE, result.to_dict())
    distributed.barrier()
    return result


def _flush_loss(run: Run, loss_sum: torch.Tensor) -> None:
    """Moves the device-side loss sum (averaged over ranks: the global batches' mean) to the host, stopping the
    run if it is no longer finite."""
    run.state.loss_sum += float(distributed.mean_over_ranks(loss_sum))
    loss_sum.zero_()
    if not math.isfinite(run.state.loss_sum):
        step, window = run.state.step, run.check_every
        where = f"at step {step}" if window == 1 else f"between steps {max(1, step - window + 1)} and {step}"
        # Non-finite gradients are not checked per step (that would cost a device sync); they poison the weights
        # and so show up as a non-finite loss one step later.
        raise TrainingError(f"the loss became NaN/Inf {where}; {run.checkpointer.describe_last()} (NaN/Inf "
                            f"gradients surface here one step later). Lower --lr, or pass --skip-nonfinite to skip "
                            f"such steps")


def _finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).item())


def _grads_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all().item())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy, computed class-major when the logits are laid out that way ([N, C] with stride (1, N), as
    the linear model's weight @ x.T yields): as one sample of N positions, [1, C, N], the softmax runs along
    contiguous memory, several times faster on the CPU (benchmarks/RESULTS.md, "Reference workload")."""
    if logits.dim() == 2 and logits.stride(0) == 1 and logits.stride(1) != 1:
        return nn.functional.cross_entropy(logits.t().unsqueeze(0), labels.unsqueeze(0),
                                           label_smoothing=label_smoothing, reduction=reduction)
    return nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    """The loop's default loss: cross-entropy with label smoothing, in the LossFn signature."""
    return lambda logits, labels, images: cross_entropy(logits, labels, label_smoothing)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
             precision: str = "32", rank: int = 0, world: int = 1) -> tuple[float, float]:
    """Accuracy (0-1) and mean cross-entropy over a whole evaluation set, summed across ranks."""
    totals = eval_totals(model, images, labels, batch_size, device, precision, rank, world)
    return _ratios(distributed.all_reduce_sum(totals))


def _ratios(totals: torch.Tensor) -> tuple[float, float]:
    correct, loss_total, n = totals.tolist()
    return correct / max(1.0, n), loss_total / max(1.0, n)


@torch.inference_mode()
def eval_totals(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                precision: str = "32", rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's share of an evaluation: [correct predictions, summed cross-entropy, images]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for x, y in eval_batches(images, labels, batch_size, rank, world):
            with autocast(device, precision):
                logits = model(x.to(device, non_blocking=True)).float()
            y = y.to(device, non_blocking=True)
            # Row-major for argmax, which ran 5x slower along the rows of class-major logits (see cross_entropy).
            correct += (logits.contiguous().argmax(1) == y).sum()
            loss_sum += cross_entropy(logits, y, reduction="sum")
            count += len(y)
    finally:
        model.train(was_training)
    return torch.stack([correct, loss_sum, count])


def make_optimizer(config: cfg.TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    # foreach kernels batch the per-parameter updates: fewer kernel launches per step on both CPU and GPU.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.momentum > 0, foreach=True)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, foreach=True)


def make_scheduler(config: cfg.TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of `config` over `total_steps` (see Schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(config.schedule, config.warmup, total_steps))


class Schedule:
    """Learning-rate factor per step, with a linear warm-up over `warmup` of the steps.

    one-cycle: linear from lr/25 up to lr, then linear down to lr/25,000, with no momentum cycling (as in the
    fastest published MNIST recipes); cosine: down to 0; constant: flat.

    `stretch` re-plans the rest over another number of steps (a time budget's): step n then reads the schedule
    at position anchor + (n - at) * rate of the `total` it was made for, which goes on from where it was. A
    callable object, so that LambdaLR's state_dict (the checkpoint) keeps these fields.
    """

    def __init__(self, kind: str, warmup: float, total_steps: int):
        self.kind, self.total, self.warmup_steps = kind, total_steps, int(warmup * total_steps)
        self.anchor, self.at, self.rate = 0.0, 0, 1.0

    def __call__(self, step: int) -> float:
        position = self.anchor + (step - self.at) * self.rate
        floor = 1.0 / 25 if self.kind == "onecycle" else 0.0
        if position < self.warmup_steps:
            return floor + (1.0 - floor) * position / self.warmup_steps if floor else (position + 1) / self.warmup_steps
        progress = min(1.0, (position - self.warmup_steps) / max(1, self.total - self.warmup_steps))
        if self.kind == "onecycle":
            return 1.0 - (1.0 - 1.0 / 25_000) * progress
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def stretch(self, step: int, total_steps: int) -> None:
        """Spreads what is left of the schedule after `step` over the steps up to `total_steps`."""
        self.anchor = self.anchor + (step - self.at) * self.rate
        self.at = step
        self.rate = (self.total - self.anchor) / max(1, total_steps - step)


def _tensorboard(run_dir: Path, step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a crashed run logged past its last checkpoint.
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step or None)
