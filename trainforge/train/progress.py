"""Progress bars on stderr (stdout stays clean for `--json`): one `Bar` for every verb, and the training loop's
reporter, updated cheaply from the hot loop."""

from __future__ import annotations

import sys
import time
from typing import Any


class Bar:
    """A rich progress bar on stderr: label, bar, done/total, then one text column per field; inert when disabled."""

    def __init__(self, enabled: bool, label: str, total: int, *, completed: int = 0, fields: tuple[str, ...] = (),
                 clock: str | None = None):
        self.progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.table import Column

        # The label keeps its width when a narrow console (80 columns off a terminal) squeezes the row.
        columns = [TextColumn(f"[bold]{label}", table_column=Column(no_wrap=True, min_width=len(label))), BarColumn(),
                   MofNCompleteColumn(), *[TextColumn(f"{{task.fields[{f}]}}") for f in fields]]
        if clock is not None:
            columns.append(TimeElapsedColumn() if clock == "elapsed" else TimeRemainingColumn())
        self.progress = Progress(*columns, console=Console(file=sys.stderr), transient=False)
        self.task = self.progress.add_task(label, total=total, completed=completed, **{f: "" for f in fields})
        self.progress.start()

    def update(self, **values: Any) -> None:
        """Sets `completed` and/or fields."""
        if self.progress is not None:
            self.progress.update(self.task, **values)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def print(self, line: str) -> None:
        """One line above the bar."""
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ProgressReporter:
    """Shows steps, samples/s and ETA while training, and one line per finished epoch."""

    # Redrawing costs tens of microseconds; a short step must not pay it every time.
    MIN_INTERVAL_S = 0.1

    def __init__(self, enabled: bool, total_steps: int, samples_per_step: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.bar = Bar(False, "train", total_steps)
        self.last_update = 0.0

    def start(self, completed: int) -> None:
        self.bar = Bar(self.enabled, "train", self.total_steps, completed=completed, fields=("rate", "metrics"),
                       clock="remaining")
        self.start_time = time.perf_counter()
        self.start_step = completed

    def step(self, global_step: int) -> None:
        if self.bar.progress is None:
            return
        now = time.perf_counter()
        if now - self.last_update < self.MIN_INTERVAL_S and global_step < self.total_steps:
            return
        self.last_update = now
        rate = (global_step - self.start_step) * self.samples_per_step / max(now - self.start_time, 1e-9)
        self.bar.update(completed=global_step, rate=f"{rate:,.0f} samples/s")

    def epoch_done(self, record: dict[str, Any]) -> None:
        self.bar.update(completed=record["step"], metrics=f"epoch {record['epoch']} loss {record['train_loss']:.4f} "
                                                          f"test acc {record['test_acc']:.4f}{_subset_text(record)}"
                                                          f"{_monitor_text(record)}")

    def close(self) -> None:
        self.bar.close()


def _subset_text(record: dict[str, Any]) -> str:
    subset = record.get("eval_subset")
    return f" (on a subset of {subset:,} test images)" if subset else ""


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
