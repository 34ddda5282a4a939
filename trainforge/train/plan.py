"""The memory plan of a run: what a sample costs, measured, and the batch sizes that keep the run inside its budget.

The probe runs one forward/backward pass (and one evaluation forward) of a copy of the model at two small batch
sizes on real images, counting the bytes of every tensor storage the operations create while they are alive; the
peaks split into a fixed part and a part per sample. Tensor bytes are what a device allocator sees on a GPU; on the
CPU the resident memory also holds allocator slack and oneDNN scratch space, hence the SAFETY factor. Training
micro-batches, the gradient accumulation and the evaluation batch then follow from the budget
(hardware/memory.py), what the process holds already, and the optimizer's state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError
from ..hardware.cpuinfo import last_level_cache_bytes
from ..hardware.memory import format_bytes
from .device import autocast, synchronize

# Measured tensor bytes -> resident bytes on the CPU (RESULTS.md, "Memory plan").
SAFETY = 1.5
PROBE_SIZES = (2, 4)
# Larger evaluation batches are no faster; the default --eval-batch-size.
EVAL_CAP = 2000
# On a CPU, evaluation ran fastest in batches whose activations fit the last-level cache, up to 3x faster than in
# batches of 2,000 (benchmarks/RESULTS.md, "Evaluation batches on a CPU"); this size where sysfs does not say.
CPU_CACHE_BYTES = 32 * 2 ** 20
# --batch-size auto keeps at least this many optimizer steps per epoch.
MIN_STEPS_PER_EPOCH = 8
# --batch-size auto on the CPU: a doubling must raise samples/s by this factor to be worth it.
CPU_GAIN = 1.1


@dataclasses.dataclass
class SampleCost:
    """Peak bytes of a pass: fixed + per_sample * batch."""

    train_fixed: int
    train_per_sample: int
    eval_fixed: int
    eval_per_sample: int


@dataclasses.dataclass
class MemoryPlan:
    """What a run was planned to hold, and the batch sizes that follow."""

    budget: int
    budget_source: str
    in_use: int  # bytes held when planned: the interpreter, data, model
    state_bytes: int  # gradients and optimizer state
    cost: SampleCost
    micro_batch: int  # per process
    accumulate: int
    eval_batch_size: int
    eval_bound: str = "cap"  # what set eval_batch_size: "cap", "memory" or "cache"

    def describe(self) -> str:
        return (f"memory plan: budget {format_bytes(self.budget)} ({self.budget_source}), "
                f"{format_bytes(self.in_use)} in use; a sample costs {format_bytes(self.cost.train_per_sample)} to "
                f"train, {format_bytes(self.cost.eval_per_sample)} to evaluate -> micro-batches of "
                f"{self.micro_batch} x {self.accumulate} accumulated, evaluation batches of {self.eval_batch_size}"
                f"{BOUND_NOTES[self.eval_bound]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created under it while they are alive, and their peak."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Never runs under torch.compile; torch would otherwise import its compiler (1.1 s) at the first operation.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.sizes:
                continue
            self.sizes[key] = storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)  # storages keep their Python object while alive
        return out


def _peak(fn: Callable[[], None]) -> int:
    with _LiveBytes() as tracker:
        fn()
    return tracker.peak


def _line(peaks: list[int]) -> tuple[int, int]:
    """(fixed, per sample) through the peaks at PROBE_SIZES."""
    (b1, b2), (p1, p2) = PROBE_SIZES, peaks
    per_sample = max(1, (p2 - p1) // (b2 - b1))
    return max(0, p1 - per_sample * b1), per_sample


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
            precision: str, train: bool = True, eval_precision: str | None = None) -> SampleCost:
    """The cost of training (unless not `train`: 0) and evaluating (in `eval_precision`, default `precision`)
    `model` on batches like `images`."""
    try:
        probe = copy.deepcopy(model)  # train-mode passes move batch-norm statistics and step-counting hooks
    except RuntimeError:  # a pruned model's weights are mask * original, non-leaf tensors that deepcopy refuses
        probe = model
    saved = {k: v.clone() for k, v in model.state_dict().items()} if probe is model else None
    was_training = model.training
    idx = torch.arange(max(PROBE_SIZES)) % len(images)
    x, y = images[idx].to(device), labels[idx].to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        probe.train()

        def train_pass(b: int) -> None:
            with autocast(device, precision):
                logits = probe(x[:b])
            nn.functional.cross_entropy(logits.float(), y[:b]).backward()
            probe.zero_grad(set_to_none=True)

        def eval_pass(b: int) -> None:
            with torch.inference_mode(), autocast(device, eval_precision or precision):
                probe(x[:b])
        train_peaks = [_peak(lambda b=b: train_pass(b)) if train else 0 for b in PROBE_SIZES]
        probe.eval()
        eval_peaks = [_peak(lambda b=b: eval_pass(b)) for b in PROBE_SIZES]
    if saved is not None:
        model.load_state_dict(saved)
        model.train(was_training)
    train_fixed, train_per_sample = _line(train_peaks)
    eval_fixed, eval_per_sample = _line(eval_peaks)
    # At probe sizes a model's fixed peak (its gradients) can hide what a sample adds in training, which is at least
    # what it adds in evaluation.
    return SampleCost(train_fixed, max(train_per_sample, eval_per_sample), eval_fixed, eval_per_sample)


def state_bytes(model: nn.Module, optimizer: str, momentum: float | None) -> int:
    """Gradients and optimizer state of the trainable parameters."""
    per_param = 1 + (2 if optimizer in ("adam", "adamw") else 1 if momentum else 0)
    return per_param * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def max_micro_batch(cost: SampleCost, budget: int, in_use: int, state: int) -> int:
    """The largest training batch per process the budget holds, at least 1 (else a ConfigError)."""
    room = budget - in_use - state - cost.train_fixed
    largest = int(room // (cost.train_per_sample * SAFETY))
    if largest < 1:
        raise ConfigError(f"the memory budget {format_bytes(budget)} leaves {format_bytes(max(0, room))} for "
                          f"training after the {format_bytes(in_use + state)} in use, less than one sample needs "
                          f"({format_bytes(cost.train_per_sample * SAFETY)}); raise --memory-budget or lower "
                          f"--image-size")
    return largest


def fit(cost: SampleCost, budget: int, budget_source: str, in_use: int, state: int, per_rank_batch: int,
        accumulate: int | None, eval_cap: int | None, device: torch.device) -> MemoryPlan:
    """The plan for a batch of `per_rank_batch` per process: micro-batches as large as fit, at least `accumulate`
    of them, and evaluation batches of at most `eval_cap` that fit beside the training state."""
    largest = max_micro_batch(cost, budget, in_use, state)
    steps = min(per_rank_batch, max(accumulate or 1, math.ceil(per_rank_batch / largest)))
    eval_batch, bound = _eval_batch(cost, budget - in_use - state, eval_cap, device)
    return MemoryPlan(budget=budget, budget_source=budget_source, in_use=in_use, state_bytes=state, cost=cost,
                      micro_batch=math.ceil(per_rank_batch / steps), accumulate=steps, eval_batch_size=eval_batch,
                      eval_bound=bound)


BOUND_NOTES = {"cap": "", "memory": " (what fits the budget)",
               "cache": " (activations within the CPU's last-level cache, where evaluation ran fastest)"}


def _eval_batch(cost: SampleCost, room: int, cap: int | None, device: torch.device) -> tuple[int, str]:
    """The evaluation batch and what bounds it: `cap` (given, else EVAL_CAP), what fits `room`, and on a CPU
    without a given cap the batch whose activations fit the last-level cache."""
    bounds = {"cap": cap or EVAL_CAP, "memory": int((room - cost.eval_fixed) // (cost.eval_per_sample * SAFETY))}
    if cap is None and device.type == "cpu":
        bounds["cache"] = (last_level_cache_bytes() or CPU_CACHE_BYTES) // cost.eval_per_sample
    bound = min(bounds, key=bounds.get)
    size = max(1, bounds[bound])
    return size - size % 8 if size >= 16 and bound != "cap" else size, bound


def eval_batch_size(model: nn.Module, images: torch.Tensor, device: torch.device, precision: str,
                    memory_budget: str | None, cap: int | None) -> tuple[int, str]:
    """The largest evaluation batch (at most `cap`) of `model` that fits the budget beside what the process holds
    now, and the line that says so; for verbs that only evaluate."""
    from ..hardware import memory

    budget, source = memory.budget(memory_budget, device)
    cost = measure(model, images, images.new_zeros(len(images), dtype=torch.int64), device, precision, train=False)
    size, bound = _eval_batch(cost, budget - memory.in_use_bytes(device), cap, device)
    return size, (f"memory plan: budget {format_bytes(budget)} ({source}); an image costs "
                  f"{format_bytes(cost.eval_per_sample)} to evaluate -> batches of {size}{BOUND_NOTES[bound]}")


def auto_batch_size(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    precision: str, largest: int, n_train: int) -> tuple[int, str]:
    """--batch-size auto: (the batch size, why). On a GPU the largest power of two whose trial step fits; on the
    CPU the power of two past which samples/s grows by less than CPU_GAIN per doubling; both within `largest` (the
    memory plan's) and MIN_STEPS_PER_EPOCH steps per epoch."""
    limit = max(1, min(largest, n_train // MIN_STEPS_PER_EPOCH))
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    devices = [device] if device.type == "cuda" else []
    best, best_rate, size = 1, 0.0, 16 if limit >= 16 else 1
    with torch.random.fork_rng(devices=devices):
        while size <= limit:
            idx = torch.arange(size) % len(images)
            x, y = images[idx].to(device), labels[idx].to(device)
            try:
                rate = _samples_per_second(probe, optimizer, x, y, device, precision)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return best, f"the largest power of two whose trial step fit ({size} ran out of memory)"
            if device.type != "cuda" and rate < best_rate * CPU_GAIN:
                return best, (f"samples/s grew by less than {CPU_GAIN:g}x past it ({best_rate:,.0f} at {best}, "
                              f"{rate:,.0f} at {size})")
            best, best_rate, size = size, rate, size * 2
    return best, (f"the largest power of two within the memory plan's {largest} per micro-batch and "
                  f"{MIN_STEPS_PER_EPOCH} steps per epoch")


def _samples_per_second(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        device: torch.device, precision: str, steps: int = 2) -> float:
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            synchronize(device)
            started = time.perf_counter()
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * len(y) / (time.perf_counter() - started)


def scaled_lr(lr: float, rule: str, batch_size: int, base_batch_size: int) -> float:
    """The learning rate at `batch_size` for one set at `base_batch_size`: linear or square-root scaling."""
    ratio = batch_size / base_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))
