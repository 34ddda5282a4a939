"""The training loop: config -> data -> model -> optimizer -> steps -> evaluation -> checkpoints, top to bottom.

Speed comes from what is *not* here: data stay on the device as uint8 (normalization is the model's first layer),
there is no per-sample Python, the loss is read back to the host only where a decision needs it, and evaluation
runs in large batches under `inference_mode`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import config as cfg
from .. import runs
from ..data import DataBundle, eval_batches, load_data, make_train_loader
from ..data.loaders import holdout_split
from ..errors import CheckpointError, ConfigError, TrainingError
from ..models import build_classifier
from ..models.registry import effective_width
from . import distributed, recipes
from .device import autocast, configure_backends, configure_host_allocator, resolve_device, resolve_precision, synchronize
from .monitor import Monitor
from .progress import ProgressReporter


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train(config: cfg.TrainConfig | dict | None = None, *, resume: str | os.PathLike | None = None,
          model: nn.Module | None = None, data: DataBundle | None = None,
          param_groups: Callable[[nn.Module], list[dict]] | None = None, loss_fn: LossFn | None = None,
          model_info: runs.ModelInfo | None = None, progress: bool = True,
          on_epoch: Callable[[dict[str, Any]], bool] | None = None) -> TrainResult:
    """Trains a model as `config` says and writes a run directory; returns the final metrics.

    `resume` continues the run in that directory from its last checkpoint (its saved config wins, except for
    fields passed explicitly in `config`). The keyword hooks let other verbs reuse this loop: `model` replaces the
    registry model (it must take raw uint8 images), `data` a loaded bundle, `param_groups` builds optimizer groups
    (e.g. a lower learning rate for a backbone), `loss_fn(logits, labels, images)` replaces cross-entropy, and
    `model_info` records how to rebuild `model` for `load()`. `on_epoch(record)` sees each epoch's metrics record
    and stops the run early by returning True (e.g. a tuner pruning a bad trial).
    """
    if isinstance(config, dict):
        config = cfg.from_dict(cfg.TrainConfig, config)
    config = config or cfg.TrainConfig()
    state: dict[str, Any] | None = None
    if resume is not None:
        config, state = _load_resume(Path(resume), config)
    config = recipes.resolve(config)

    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    rank, world = distributed.setup(device)
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")
    configure_backends(device)
    configure_host_allocator()
    torch.manual_seed(config.seed)

    bundle = data or load_data(config.data, config.data_dir, subset=config.subset, seed=config.seed,
                               image_size=config.image_size, val_fraction=config.val_fraction, loader=config.loader)
    if config.holdout:
        bundle = holdout_split(bundle, config.val_fraction, config.seed)
    if model is None:
        model = build_classifier(config.model, len(bundle.classes), bundle.in_channels, bundle.image_size,
                                 bundle.mean, bundle.std, width=config.width)
    info = model_info or runs.ModelInfo(model=config.model, num_classes=len(bundle.classes),
                                        classes=list(bundle.classes), in_channels=bundle.in_channels,
                                        image_size=bundle.image_size, mean=list(bundle.mean), std=list(bundle.std),
                                        width=effective_width(config.model, config.width))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    train_loader = make_train_loader(bundle, config.batch_size, device=device, seed=config.seed,
                                     augment=config.augment, workers=config.workers, rank=rank, world_size=world)
    test_images = bundle.test.images.to(device)
    test_labels = bundle.test.labels.to(device)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    n_train = len(bundle.train.labels)  # also for a streamed set, whose images stay on disk
    # Counts the FLOPs per sample now, while `model` is still whole (FSDP shards it below).
    monitor = Monitor(model, test_images[:1], device, precision, world_size=world, sample_gpu=rank == 0)

    # DDP, or FSDP sharding `model` in place; before the optimizer is built, as FSDP replaces the parameters.
    step_model = distributed.wrap(model, config.strategy, device, world)
    groups = param_groups(model) if param_groups else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = make_optimizer(config, groups, device)
    scheduler = make_scheduler(config, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    criterion = loss_fn or _cross_entropy(config.label_smoothing)

    run_dir = Path(config.out) if config.out else _default_run_dir()
    is_main = rank == 0
    if is_main:
        _make_run_dir(run_dir)
        runs.write_text(run_dir / runs.CONFIG_FILE, cfg.dumps(dataclasses.replace(config, out=str(run_dir))))
        runs.write_json(run_dir / runs.MODEL_INFO, dataclasses.asdict(info))

    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "elapsed": 0.0, "skips": 0,
                "loss_sum": 0.0, "loss_count": 0}
    metrics: list[dict[str, Any]] = []
    if state is not None:
        _restore(state, model, optimizer, scheduler, scaler, device)
        position.update(state["position"])
        metrics = list(state["metrics"])

    if config.compile:
        step_model = torch.compile(step_model)

    writer = _tensorboard(run_dir, position["global_step"]) if is_main and config.tensorboard else None
    checkpointer = Checkpointer(run_dir, config, is_main)
    if state is not None:
        checkpointer.last_step = position["global_step"]
    reporter = ProgressReporter(enabled=progress and is_main, total_steps=total_steps,
                                samples_per_step=config.batch_size)
    # On the CPU a host read of the loss costs nothing, so every step is checked; on a GPU the read would stall the
    # pipeline, so the loss is summed on the device and checked at a few sync points per epoch.
    check_every = 1 if device.type == "cpu" or config.skip_nonfinite else max(1, steps_per_epoch // 8)

    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # A run killed after its last epoch's checkpoint resumes straight to the end: its result is that epoch's.
    result_acc, result_loss = (metrics[-1]["test_acc"], metrics[-1]["test_loss"]) if metrics else (math.nan, math.nan)
    stopped_early = False
    synchronize(device)
    started = time.perf_counter() - position["elapsed"]
    reporter.start(position["global_step"])
    monitor.start()
    try:
        for epoch in range(position["epoch"], num_epochs):
            model.train()
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            train_loader.set_epoch(epoch, position["step_in_epoch"])
            epoch_start = time.perf_counter()
            first_step = position["step_in_epoch"]
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for step, (images, labels) in enumerate(train_loader, start=first_step):
                if step >= epoch_steps:
                    break
                with autocast(device, precision):
                    logits = step_model(images)
                    loss = criterion(logits.float(), labels, images)
                if world > 1:
                    global_count = min(config.batch_size, n_train - step * config.batch_size)
                    loss = loss * distributed.loss_weight(len(labels), global_count, world)
                optimizer.zero_grad(set_to_none=True)
                # Summed over ranks, so that all of them skip (or not) together.
                if config.skip_nonfinite and not _finite(distributed.all_reduce_sum(loss.detach().clone())):
                    _skip_step(position, scheduler, step)
                    continue
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if config.skip_nonfinite and not _grads_finite(model):
                        optimizer.zero_grad(set_to_none=True)
                        _skip_step(position, scheduler, step)
                        continue
                    optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
                position["loss_count"] += 1
                _advance(position, step)
                checkpoint_due = checkpointer.due(position["global_step"])
                if (step + 1) % check_every == 0 or checkpoint_due:
                    _flush_loss(position, loss_sum, check_every, checkpointer)
                reporter.step(position["global_step"])
                if checkpoint_due:
                    position["elapsed"] = time.perf_counter() - started
                    checkpointer.save(model, optimizer, scheduler, scaler, position, metrics)
            _flush_loss(position, loss_sum, check_every, checkpointer)
            train_phase_seconds = time.perf_counter() - epoch_start  # the flush above synchronized the device
            train_loss = position["loss_sum"] / max(1, position["loss_count"])

            test_acc, test_loss = evaluate(model, test_images, test_labels, config.eval_batch_size, device, precision,
                                           rank, world)
            result_acc, result_loss = test_acc, test_loss
            synchronize(device)
            epoch_seconds = time.perf_counter() - epoch_start
            position.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0,
                            elapsed=time.perf_counter() - started)
            record = {"epoch": epoch + 1, "step": position["global_step"], "train_loss": train_loss,
                      "test_loss": test_loss, "test_acc": test_acc, "lr": optimizer.param_groups[-1]["lr"],
                      "epoch_seconds": epoch_seconds,
                      "samples_per_second": (epoch_steps - first_step) * config.batch_size / epoch_seconds,
                      "elapsed_seconds": position["elapsed"]}
            record.update(monitor.epoch_stats((epoch_steps - first_step) * config.batch_size, train_phase_seconds))
            metrics.append(record)
            reporter.epoch_done(record)
            if writer is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step") and value is not None:
                        writer.add_scalar(key, value, position["global_step"])
                writer.flush()
            stop = config.target_acc is not None and test_acc >= config.target_acc
            stop = bool(on_epoch is not None and on_epoch(record)) or stop
            checkpointer.save(model, optimizer, scheduler, scaler, position, metrics, epoch_end=True)
            if stop:
                stopped_early = position["global_step"] < total_steps
                break
    finally:
        reporter.close()
        monitor.close()
        if writer is not None:
            writer.close()

    train_seconds = time.perf_counter() - started
    samples = position["global_step"] * config.batch_size
    result = TrainResult(
        test_acc=result_acc, test_loss=result_loss, train_loss=metrics[-1]["train_loss"] if metrics else float("nan"),
        epochs=position["global_step"] / steps_per_epoch, steps=position["global_step"],
        train_seconds=train_seconds, samples_per_second=samples / train_seconds if train_seconds > 0 else 0.0,
        device=str(device), precision=precision, world_size=world, run_dir=str(run_dir) if is_main else None,
        nonfinite_skips=position["skips"], stopped_early=stopped_early)
    final_state = distributed.model_state(model)  # a collective under FSDP
    if is_main:
        runs.save_weights(run_dir / runs.MODEL_FILE, final_state)
        runs.write_json(run_dir / runs.SUMMARY_FILE, result.to_dict())
    distributed.barrier()
    return result


def _advance(position: dict[str, Any], step: int) -> None:
    position["global_step"] += 1
    position["step_in_epoch"] = step + 1


def _skip_step(position: dict[str, Any], scheduler: Any, step: int) -> None:
    """Counts a skipped non-finite step; the schedule still advances so the run keeps its planned length."""
    position["skips"] += 1
    scheduler.step()
    _advance(position, step)


def _flush_loss(position: dict[str, Any], loss_sum: torch.Tensor, window: int, checkpointer: "Checkpointer") -> None:
    """Moves the device-side loss sum (averaged over ranks: the global batches' mean) to the host, stopping the
    run if it is no longer finite."""
    position["loss_sum"] += float(distributed.mean_over_ranks(loss_sum))
    loss_sum.zero_()
    if not math.isfinite(position["loss_sum"]):
        _raise_nonfinite(position, window, checkpointer)


def _finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).item())


def _grads_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all().item())


def _raise_nonfinite(position: dict[str, Any], window: int, checkpointer: "Checkpointer") -> None:
    step = position["global_step"]
    where = f"at step {step}" if window == 1 else f"between steps {max(1, step - window + 1)} and {step}"
    last = checkpointer.describe_last()
    # Non-finite gradients are not checked per step (that would cost a device sync); they poison the weights and
    # so show up as a non-finite loss one step later.
    raise TrainingError(f"the loss became NaN/Inf {where}; {last} (NaN/Inf gradients surface here one step "
                        f"later). Lower --lr, or pass --skip-nonfinite to skip such steps")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy, computed class-major when the logits are laid out that way ([N, C] with stride (1, N), as
    the linear model's weight @ x.T yields): as one sample of N positions, [1, C, N], the softmax runs along
    contiguous memory. For 2048 x 10 logits that made the loss's forward and backward 3.5x faster on the CPU."""
    if logits.dim() == 2 and logits.stride(0) == 1 and logits.stride(1) != 1:
        return nn.functional.cross_entropy(logits.t().unsqueeze(0), labels.unsqueeze(0),
                                           label_smoothing=label_smoothing, reduction=reduction)
    return nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)


def _cross_entropy(label_smoothing: float) -> LossFn:
    return lambda logits, labels, images: cross_entropy(logits, labels, label_smoothing)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
             precision: str = "32", rank: int = 0, world: int = 1) -> tuple[float, float]:
    """Accuracy (0-1) and mean cross-entropy over a whole evaluation set, summed across ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in eval_batches(images, labels, batch_size, rank, world):
        with autocast(device, precision):
            logits = model(x.to(device, non_blocking=True)).float()
        y = y.to(device, non_blocking=True)
        # Row-major for argmax, which ran 5x slower along the rows of class-major logits (see cross_entropy).
        correct += (logits.contiguous().argmax(1) == y).sum()
        loss_sum += cross_entropy(logits, y, reduction="sum")
        count += len(y)
    totals = distributed.all_reduce_sum(torch.stack([correct, loss_sum, count]))
    model.train(was_training)
    correct_n, loss_total, n = totals.tolist()
    return correct_n / max(1.0, n), loss_total / max(1.0, n)


def make_optimizer(config: cfg.TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    # foreach kernels batch the per-parameter updates: fewer kernel launches per step on both CPU and GPU.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.momentum > 0, foreach=True)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, foreach=True)


def make_scheduler(config: cfg.TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules, all with a linear warm-up over `warmup` of the steps.

    one-cycle: linear from lr/25 up to lr, then linear down to lr/25,000, with no momentum cycling (as in the
    fastest published MNIST recipes); cosine: down to 0; constant: flat.
    """
    warmup_steps = int(config.warmup * total_steps)
    floor = 1.0 / 25 if config.schedule == "onecycle" else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return floor + (1.0 - floor) * step / warmup_steps if floor else (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if config.schedule == "onecycle":
            return 1.0 - (1.0 - 1.0 / 25_000) * progress
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Checkpointer:
    """Writes `state.pt` at epoch ends and every N steps / M minutes, atomically; only rank 0 writes."""

    def __init__(self, run_dir: Path, config: cfg.TrainConfig, enabled: bool):
        self.run_dir = run_dir
        self.config = config
        self.enabled = enabled
        self.every_steps = config.checkpoint_every
        self.every_seconds = config.checkpoint_minutes * 60 if config.checkpoint_minutes else None
        self.last_time = time.monotonic()
        self.last_step: int | None = None

    def due(self, global_step: int) -> bool:
        if self.every_steps and global_step % self.every_steps == 0:
            return True
        return bool(self.every_seconds and time.monotonic() - self.last_time >= self.every_seconds)

    def describe_last(self) -> str:
        if self.last_step is None:
            return "no checkpoint was written in this process"
        return f"last good checkpoint: {self.run_dir / runs.STATE_FILE} (step {self.last_step})"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
             position: dict[str, Any], metrics: list[dict[str, Any]], epoch_end: bool = False) -> None:
        self.last_time = time.monotonic()
        # Under FSDP gathering the full states is a collective: every rank takes part, rank 0 writes.
        model_state = distributed.model_state(model)
        optimizer_state = distributed.optimizer_state(model, optimizer)
        if not self.enabled:
            return
        if not all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point()):
            raise TrainingError(f"the weights hold NaN/Inf at step {position['global_step']}; not overwriting the "
                                f"checkpoint. {self.describe_last()}")
        state = {
            "format": 1,
            "model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "position": dict(position),
            "metrics": metrics,
            "config": cfg.to_dict(self.config),
        }
        try:
            runs.save_state(self.run_dir / runs.STATE_FILE, state)
            self.last_step = position["global_step"]
            if epoch_end:
                runs.write_metrics(self.run_dir, metrics)
                runs.save_weights(self.run_dir / runs.MODEL_FILE, model_state)
        except CheckpointError as exc:
            resume = (f"once it is writable again, continue with --resume {self.run_dir}" if self.last_step is not None
                      else "nothing to resume from")
            raise TrainingError(f"stopped at step {position['global_step']}: {exc}; {self.describe_last()}; "
                                f"{resume}") from None


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
             device: torch.device) -> None:
    try:
        distributed.load_model_state(model, state["model"])
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"][:torch.cuda.device_count()])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{runs.STATE_FILE}: checkpoint does not match this run ({exc})") from None


def _load_resume(run_dir: Path, overrides: cfg.TrainConfig) -> tuple[cfg.TrainConfig, dict[str, Any]]:
    """The saved config (with explicitly set fields of `overrides` on top) and the saved state of a run."""
    config_path = run_dir / runs.CONFIG_FILE
    state_path = run_dir / runs.STATE_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run directory")
    if not state_path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no checkpoint ({runs.STATE_FILE}) to resume from")
    saved = cfg.load_file(cfg.TrainConfig, config_path)
    defaults = cfg.to_dict(cfg.TrainConfig())
    changed = {k: v for k, v in cfg.to_dict(overrides).items() if v != defaults[k]}
    config = cfg.merge(cfg.TrainConfig, cfg.to_dict(saved), changed, {"out": str(run_dir)}, source=str(config_path))
    state = runs.safe_torch_load(state_path)
    _check_state(state, state_path)
    return config, state


_POSITION_TYPES = {"epoch": int, "step_in_epoch": int, "global_step": int, "elapsed": (int, float), "skips": int,
                   "loss_sum": (int, float), "loss_count": int}


def _check_state(state: Any, path: Path) -> None:
    """Raises CheckpointError, naming `path`, unless `state` has the layout `Checkpointer.save` writes."""
    def fail(why: str) -> None:
        raise CheckpointError(f"{path}: not a trainforge checkpoint ({why})")

    if not isinstance(state, dict):
        fail(f"expected a mapping, found {type(state).__name__}")
    for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("position", dict),
                      ("metrics", list), ("rng_cpu", torch.Tensor)):
        if not isinstance(state.get(key), kind):
            fail(f"'{key}' is missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        fail("'model' must map parameter names to tensors")
    for key, kind in _POSITION_TYPES.items():
        value = state["position"].get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            fail(f"position '{key}' is {value!r}, expected a non-negative number")
    if not all(isinstance(m, dict) and isinstance(m.get("test_acc"), (int, float))
               and isinstance(m.get("test_loss"), (int, float)) for m in state["metrics"]):
        fail("'metrics' must be a list of per-epoch records with test_acc and test_loss")


def _make_run_dir(run_dir: Path) -> None:
    """Creates the run directory (or reuses it), clearing temporaries a killed run left behind."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file, expected a run directory (or a path to create one at)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {run_dir}: cannot create the run directory ({exc.strerror or exc})") from None
    runs.remove_stale_temporaries(run_dir)


def _default_run_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    suffix = 1
    while path.exists():
        path = Path("runs") / f"{stamp}-{suffix}"
        suffix += 1
    return path


def _tensorboard(run_dir: Path, global_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a crashed run logged past its last checkpoint.
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=global_step or None)


def summary_line(result: TrainResult) -> str:
    return json.dumps(result.to_dict())
