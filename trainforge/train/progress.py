"""A rich progress bar on stderr (stdout stays clean for `--json`), updated cheaply from the hot loop."""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressReporter:
    """Shows steps, samples/s and ETA while training, and one line per finished epoch."""

    # Redrawing costs tens of microseconds; a short step must not pay it every time.
    MIN_INTERVAL_S = 0.1

    def __init__(self, enabled: bool, total_steps: int, samples_per_step: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.progress: Any = None
        self.task: Any = None
        self.last_update = 0.0

    def start(self, completed: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[metrics]}"), TimeRemainingColumn(),
            console=Console(file=sys.stderr), transient=False)
        self.task = self.progress.add_task("train", total=self.total_steps, completed=completed, rate="",
                                           metrics="")
        self.progress.start()
        self.start_time = time.perf_counter()
        self.start_step = completed

    def step(self, global_step: int) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        if now - self.last_update < self.MIN_INTERVAL_S and global_step < self.total_steps:
            return
        self.last_update = now
        rate = (global_step - self.start_step) * self.samples_per_step / max(now - self.start_time, 1e-9)
        self.progress.update(self.task, completed=global_step, rate=f"{rate:,.0f} samples/s")

    def epoch_done(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=record["step"],
                             metrics=f"epoch {record['epoch']} loss {record['train_loss']:.4f} "
                                     f"test acc {record['test_acc']:.4f}{_monitor_text(record)}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _monitor_text(record: dict[str, Any]) -> str:
    """The live-monitoring figures of an epoch record (train/monitor.py), those that are known."""
    parts = []
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("max_memory_mb") is not None:
        parts.append(f"peak mem {record['max_memory_mb']:,.0f} MiB")
    if record.get("gpu_util_percent") is not None:
        parts.append(f"GPU {record['gpu_util_percent']:.0f}% {record['gpu_power_watts']:.0f} W")
    return "".join(f" {p}" for p in parts)
