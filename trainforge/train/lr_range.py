"""The learning-rate range test (Smith 2017; fastai's lr_find): train a copy of the model for a few steps while the
learning rate grows exponentially, record the smoothed loss, and suggest a tenth of the rate where it was lowest. The model, the optimizer state and the random number generators are left as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .. import config as cfg
from .device import autocast

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.98  # of the loss's exponential moving average
DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this multiple of its minimum


@dataclasses.dataclass
class RangeTest:
    """The rates tried, the smoothed losses at them, and the suggestion with its reason."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def range_test(model: nn.Module, loader: Any, config: cfg.TrainConfig, device: torch.device, precision: str,
               steps: int = STEPS, start_lr: float = START_LR, end_lr: float = END_LR) -> RangeTest:
    """Runs the test on a copy of `model` with `config`'s optimizer over batches of `loader`."""
    from .loop import cross_entropy, make_optimizer

    probe = copy.deepcopy(model).train()
    optimizer = make_optimizer(dataclasses.replace(config, lr=start_lr),
                               [{"params": [p for p in probe.parameters() if p.requires_grad]}], device)
    gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i, (images, labels) in enumerate(_batches(loader, steps)):
            lr = start_lr * gamma ** i
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, precision):
                loss = cross_entropy(probe(images).float(), labels, config.label_smoothing or 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
            smoothed = average / (1 - SMOOTHING ** (i + 1))
            if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
                break
            best = min(best, smoothed)
            lrs.append(lr)
            losses.append(smoothed)
    return _suggest(lrs, losses)


def _batches(loader: Any, steps: int) -> Any:
    """`steps` training batches, through as many epochs of `loader` as that takes."""
    taken, epoch = 0, 0
    while taken < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            if taken == steps:
                return
            taken += 1
            yield batch
        epoch += 1


def _suggest(lrs: list[float], losses: list[float]) -> RangeTest:
    """A tenth of the rate at which the smoothed loss was lowest (fastai's lr_min): still on the falling part of
    the curve, an order of magnitude below where the loss turns up."""
    if len(losses) < 3:
        raise ValueError("the learning-rate range test diverged within its first steps")
    lowest = min(range(len(losses)), key=losses.__getitem__)
    reason = (f"a tenth of {lrs[lowest]:.2g}, where the smoothed loss was lowest ({losses[lowest]:.3f}, from "
              f"{losses[0]:.3f} at {lrs[0]:.2g}); the test stopped at {lrs[-1]:.2g}")
    return RangeTest(lrs=lrs, losses=losses, suggestion=lrs[lowest] / 10, reason=reason)


def auto_lr(config: cfg.TrainConfig, model: nn.Module, loader: Any, device: torch.device,
            precision: str) -> tuple[cfg.TrainConfig, str]:
    """--lr auto: `config` with the range test's suggestion as its learning rate, and a line saying why."""
    from ..errors import ConfigError

    try:
        result = range_test(model, loader, config, device, precision)
    except ValueError as exc:
        raise ConfigError(f"--lr auto: {exc}; pass --lr") from None
    return dataclasses.replace(config, lr=result.suggestion), f"lr auto: {result.suggestion:.3g}, {result.reason}"


def plot(result: RangeTest) -> bytes:
    """The loss against the learning rate (log scale) with the suggestion marked, as PNG bytes."""
    from ..report.plots import _figure, _png

    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses)
    ax.set_xscale("log")
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.legend()
    return _png(fig)
