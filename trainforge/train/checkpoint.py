"""The training loop's checkpoints: `state.pt` written atomically by rank 0, checked and restored on `--resume`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as cfg
from .. import runs
from ..errors import CheckpointError, TrainingError, deprecated
from . import distributed

# Format 1 kept the loop's counters in a "position" dict whose step count was named "global_step".
FORMAT = 2
_LEGACY_COUNTER_NAMES = {"global_step": "step"}
# Steps between looks at the clock for time-based checkpoints in a multi-process job.
TIME_CHECK_STEPS = 8
COUNTER_TYPES = {"epoch": int, "step_in_epoch": int, "step": int, "elapsed": (int, float), "skips": int,
                 "loss_sum": (int, float), "loss_count": int}


class Checkpointer:
    """Writes `state.pt` at epoch ends and every N steps / M minutes, atomically; only rank 0 writes."""

    def __init__(self, run_dir: Path, config: cfg.TrainConfig, enabled: bool, last_step: int | None = None, *,
                 device: torch.device = torch.device("cpu"), world: int = 1):
        self.run_dir = run_dir
        self.config = config
        self.enabled = enabled
        self.every_steps = config.checkpoint_every
        self.every_seconds = config.checkpoint_minutes * 60 if config.checkpoint_minutes else None
        self.last_time = time.monotonic()
        self.last_step = last_step
        self.device = device
        # Several processes look at rank 0's clock, at a step count all of them share: a broadcast every step
        # would cost a collective per step for a decision needed every few minutes.
        self.clock_every = 1 if world == 1 else TIME_CHECK_STEPS

    def due(self, step: int) -> bool:
        """Whether to checkpoint after `step`; the same answer on every process of a job."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_seconds or step % self.clock_every:
            return False
        return distributed.agree_with_rank0(time.monotonic() - self.last_time >= self.every_seconds, self.device)

    def describe_last(self) -> str:
        if self.last_step is None:
            return "no checkpoint was written in this process"
        return f"last good checkpoint: {self.run_dir / runs.STATE_FILE} (step {self.last_step})"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
             counters: dict[str, Any], metrics: list[dict[str, Any]], epoch_end: bool = False) -> None:
        self.last_time = time.monotonic()
        # Under FSDP gathering the full states is a collective: every rank takes part, rank 0 writes.
        model_state = distributed.model_state(model)
        optimizer_state = distributed.optimizer_state(model, optimizer)
        if not self.enabled:
            return
        if not all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point()):
            raise TrainingError(f"the weights hold NaN/Inf at step {counters['step']}; not overwriting the "
                                f"checkpoint. {self.describe_last()}")
        state = {
            "format": FORMAT,
            "model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "state": dict(counters),
            "metrics": metrics,
            "config": cfg.to_dict(self.config),
        }
        try:
            runs.save_state(self.run_dir / runs.STATE_FILE, state)
            self.last_step = counters["step"]
            if epoch_end:
                runs.write_metrics(self.run_dir, metrics)
                runs.save_weights(self.run_dir / runs.MODEL_FILE, model_state)
        except CheckpointError as exc:
            resume = (f"once it is writable again, continue with --resume {self.run_dir}" if self.last_step is not None
                      else "nothing to resume from")
            raise TrainingError(f"stopped at step {counters['step']}: {exc}; {self.describe_last()}; "
                                f"{resume}") from None


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
            device: torch.device) -> None:
    """Loads a checkpoint's model, optimizer, schedule, scaler and RNG states into the run's objects."""
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


def counters(state: dict[str, Any]) -> dict[str, Any]:
    """The loop's counters of a checked checkpoint, in the current names whichever format wrote it."""
    if "state" in state:
        return dict(state["state"])
    return {_LEGACY_COUNTER_NAMES.get(k, k): v for k, v in state["position"].items()}


def load_resume(run_dir: Path, overrides: cfg.TrainConfig) -> tuple[cfg.TrainConfig, dict[str, Any] | None]:
    """The saved config (with explicitly set fields of `overrides` on top) and the saved state of a run; the state
    is None for a run stopped before its first checkpoint, which then starts over from its saved config."""
    config_path = run_dir / runs.CONFIG_FILE
    state_path = run_dir / runs.STATE_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run directory")
    if not state_path.is_file() and not config_path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no checkpoint ({runs.STATE_FILE}) and no saved config "
                              f"({runs.CONFIG_FILE}) to resume from")
    saved = cfg.load_file(cfg.TrainConfig, config_path)
    defaults = cfg.to_dict(cfg.TrainConfig())
    changed = {k: v for k, v in cfg.to_dict(overrides).items() if v != defaults[k]}
    config = cfg.merge(cfg.TrainConfig, cfg.to_dict(saved), changed, {"out": str(run_dir)}, source=str(config_path))
    if not state_path.is_file():
        if distributed.env_rank() == 0:
            print(f"--resume {run_dir}: stopped before its first checkpoint; starting it over from its saved config",
                  file=sys.stderr)
        return config, None
    state = runs.safe_torch_load(state_path)
    check_state(state, state_path)
    if "state" not in state:
        deprecated(f"{state_path}: a checkpoint of format 1 (loop counters under 'position'); its run resumes, and "
                   f"its next checkpoint is written in format {FORMAT}")
    return config, state


def check_state(state: Any, path: Path) -> None:
    """Raises CheckpointError, naming `path`, unless `state` has the layout `Checkpointer.save` writes (or wrote)."""
    def fail(why: str) -> None:
        raise CheckpointError(f"{path}: not a trainforge checkpoint ({why})")

    if not isinstance(state, dict):
        fail(f"expected a mapping, found {type(state).__name__}")
    key = "state" if "state" in state else "position"
    for name, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), (key, dict),
                       ("metrics", list), ("rng_cpu", torch.Tensor)):
        if not isinstance(state.get(name), kind):
            fail(f"'{name}' is missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        fail("'model' must map parameter names to tensors")
    names = {v: k for k, v in _LEGACY_COUNTER_NAMES.items()} if key == "position" else {}
    for name, kind in COUNTER_TYPES.items():
        value = state[key].get(names.get(name, name))
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            fail(f"{key} '{names.get(name, name)}' is {value!r}, expected a non-negative number")
    if not all(isinstance(m, dict) and isinstance(m.get("test_acc"), (int, float))
               and isinstance(m.get("test_loss"), (int, float)) for m in state["metrics"]):
        fail("'metrics' must be a list of per-epoch records with test_acc and test_loss")
