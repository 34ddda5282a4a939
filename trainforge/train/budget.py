"""A time budget filled, not merely respected: `--time` sets a run's optimizer steps from its measured speed.

The budget covers the whole process (the CLI starts its clock when the process starts): loading the data, the memory
plan, training, every evaluation, the checkpoints and the final files. The run times its first steps, then sets the
number of optimizer steps so that training, the evaluations at epoch ends and the final evaluation and files end at
the budget, and the schedule (warm-up, one-cycle or cosine) ends with them. It plans again every few percent of the
budget from the recent step time, so a machine that slows down mid-run shortens what is left of the schedule (which
keeps annealing, compressed, never cut off half-way) and one that speeds up lengthens it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

from .. import config as cfg
from ..errors import ConfigError, TrainingError
from . import recipes

# Steps timed, and the least time they take, before the first plan: the first step of a run (allocations, kernel
# choices) is never among them.
MIN_TIMED_STEPS = 5
MIN_TIMED_SECONDS = 0.5
# A plan again every this share of the budget (at least every REPLAN_MIN_SECONDS), from the step time over the
# last WINDOW shares: recent enough to see a slowed machine, long enough to average out single slow steps.
REPLAN_SHARE = 0.03
REPLAN_MIN_SECONDS = 0.5
WINDOW = 2
# Kept free at the end: the process exits (the interpreter and torch tear down) after the final files are written.
EXIT_SECONDS = 1.0
# Evaluating an image, before one is timed: about a third of training on it (a forward pass of three). Only where
# the loop cannot time one (Filler.time_evaluation): it overestimated the cnn's evaluation on a CPU 5-fold.
EVAL_SHARE_OF_STEP = 1 / 3
# A budget that leaves fewer steps than this for training is too small to be worth a run.
MIN_STEPS = 10


def check_exclusive(typed: dict[str, Any]) -> None:
    """--time and --epochs typed on one command line are an error (a saved config may hold both: see train)."""
    if typed.get("time") is not None and typed.get("epochs") is not None:
        raise ConfigError(f"--time {typed['time']} and --epochs {typed['epochs']:g} exclude each other: a time budget "
                          f"sets the number of steps from the measured step time")


def process_age() -> float:
    """Seconds since this process started (0 where /proc does not say): the interpreter's start and imports count
    against a budget too."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclasses.dataclass
class Clock:
    """How a budget reads the time, and when it began; tests pass a fake `now`."""

    now: Callable[[], float] = time.monotonic
    start: float | None = None  # now() when the budget began; None: when the run starts

    @classmethod
    def since_process_start(cls) -> "Clock":
        return cls(time.monotonic, time.monotonic() - process_age())


# Fault injection for tests of whole commands: with this set to a number of seconds, `auto`'s clocks advance that
# much per reading instead of with the wall clock, so that what a budget buys is a count of readings, the same on
# any machine. Unset (the default) it costs one look-up per command.
TICK_ENV = "TRAINFORGE_TEST_CLOCK_TICK"


class TickClock:
    """A time that moves on by `tick` seconds each time it is read."""

    def __init__(self, tick: float):
        self.t, self.tick = 0.0, tick

    def now(self) -> float:
        self.t += self.tick
        return self.t


def command_clocks() -> tuple[Clock, Callable[[], Clock]]:
    """A command's clock, started with the process, and a maker of its parts' clocks (each started when first
    used): the wall clock, or with TICK_ENV set a TickClock shared by all of them."""
    tick = os.environ.get(TICK_ENV)
    if not tick:
        return Clock.since_process_start(), Clock
    ticker = TickClock(float(tick))
    return Clock(ticker.now, ticker.now()), lambda: Clock(ticker.now)


class Deadline:
    """For loops without a schedule (constant rate) that run until a time: called after each step, True once one more
    step, as long as the last one took, would end past `deadline` (a time of `clock`)."""

    def __init__(self, clock: Clock, deadline: float):
        self.clock, self.deadline, self.steps = clock, deadline, 0
        self.last = clock.now()

    def __call__(self) -> bool:
        now = self.clock.now()
        self.steps, step_seconds, self.last = self.steps + 1, now - self.last, now
        return now + step_seconds > self.deadline


class Filler:
    """The optimizer steps of a --time run, planned from measured times and planned again as they change.

    The loop tells it the step count at points where the device is synchronized (`timed`), when an epoch end
    begins and what its evaluation and checkpoint took (`epoch_end`, `evaluated`, `saved`); `plan` then says how
    many steps in all end the run at the budget."""

    def __init__(self, text: str, clock: Clock, *, steps_per_epoch: int, batch_size: int, eval_images: int,
                 final_eval_images: int, spent_before: float = 0.0, max_steps: int | None = None):
        self.text, self.seconds = text, cfg.parse_duration(text)
        self.clock = clock
        if clock.start is None:
            clock.start = clock.now()
        self.spent_before = spent_before  # what earlier processes of this run spent (--resume)
        self.max_steps = max_steps  # a cap the budget is not filled past (see train.loop._filler)
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.eval_images, self.final_eval_images = eval_images, final_eval_images
        self.last: tuple[int, float] | None = None  # the last synchronized (step, time), None during an epoch end
        self.timed_spans: list[tuple[int, float, float]] = []  # (steps, seconds, end time) between such points
        self.step_seconds: float | None = None
        self.eval_image_seconds: float | None = None
        self.save_seconds = 0.0
        self.phase_started = 0.0
        self.planned_at: float | None = None
        self.plans = 0
        self.setup_seconds: float | None = None

    def spent(self) -> float:
        """Seconds of the budget used so far, earlier processes of a resumed run included."""
        return self.spent_before + self.clock.now() - self.clock.start

    def timed(self, step: int) -> None:
        """`step` optimizer steps are done and the device is synchronized. The span since the last such point is
        step time (the run's first step, with its warm-up, is not: it has no point before it)."""
        now = self.clock.now()
        if self.last is not None and step > self.last[0]:
            self.timed_spans.append((step - self.last[0], now - self.last[1], now))
        self.last = (step, now)

    def epoch_end(self) -> None:
        """An epoch end (evaluation, checkpoint) begins: its time is not step time."""
        self.last = None
        self.phase_started = self.clock.now()

    def evaluated(self, images: int) -> None:
        if images:
            self.eval_image_seconds = (self.clock.now() - self.phase_started) / images
        self.phase_started = self.clock.now()

    def saved(self, step: int) -> None:
        self.save_seconds = self.clock.now() - self.phase_started
        self.last = (step, self.clock.now())

    def time_evaluation(self, evaluate: Callable[[], None], images: int) -> None:
        """Times `evaluate` (of `images` images) before the first plan, so that the final evaluation is costed from
        a measurement, not a guess; the second of two passes (the first warms up), neither counted as step time."""
        evaluate()
        started = self.clock.now()
        evaluate()
        self.eval_image_seconds = (self.clock.now() - started) / images
        if self.last is not None:
            self.last = (self.last[0], self.clock.now())

    def _interval(self) -> float:
        return max(REPLAN_MIN_SECONDS, REPLAN_SHARE * self.seconds)

    def due(self, step: int, total: int) -> bool:
        """Whether to plan now: once enough steps are timed, then every REPLAN_SHARE of the budget; and before an
        unplanned run would end at its first guess of `total`."""
        if not self.timed_spans:
            return False
        if self.planned_at is None:
            steps = sum(n for n, _, _ in self.timed_spans)
            seconds = sum(t for _, t, _ in self.timed_spans)
            enough = steps >= MIN_TIMED_STEPS and seconds >= min(MIN_TIMED_SECONDS, REPLAN_SHARE * self.seconds)
            # Slow steps are planned from fewer of them, before half the budget is gone.
            return enough or step + 1 >= total or self.spent() >= self.seconds / 2
        return self.clock.now() - self.planned_at >= self._interval()

    def _step_time(self) -> float:
        """Seconds per step over the spans of the last WINDOW replanning intervals, reaching further back for at
        least MIN_TIMED_STEPS steps."""
        horizon = self.timed_spans[-1][2] - WINDOW * self._interval()
        steps = seconds = 0.0
        for n, t, end in reversed(self.timed_spans):
            if end < horizon and steps >= MIN_TIMED_STEPS:
                break
            steps, seconds = steps + n, seconds + t
        return seconds / steps

    def plan(self, step: int) -> int:
        """The total steps that end the run at the budget, seen from `step`: at least one more step, so that the
        schedule finishes its annealing however little time is left."""
        self.step_seconds = max(self._step_time(), 1e-9)  # a clock too coarse to see a step
        now = self.clock.now()
        if self.planned_at is None:
            self.setup_seconds = self.spent() - sum(t for _, t, _ in self.timed_spans)
        self.planned_at, self.plans = now, self.plans + 1
        left = self.seconds - self.spent() - EXIT_SECONDS
        lo, hi = step + 1, step + 1 + max(0, math.floor(left / self.step_seconds))
        while lo < hi:  # the most steps whose cost fits what is left (the cost grows with the steps)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cost(step, mid) <= left else (lo, mid - 1)
        return lo if self.max_steps is None else max(step + 1, min(lo, self.max_steps))

    def _eval_image_seconds(self) -> float:
        if self.eval_image_seconds is not None:
            return self.eval_image_seconds
        return self.step_seconds / self.batch_size * EVAL_SHARE_OF_STEP

    def cost(self, step: int, total: int) -> float:
        """Seconds from `step` to the end of a run of `total` steps: the steps, the epoch ends on the way (an
        evaluation and a checkpoint each) and the last one (the whole evaluation set, the final files)."""
        per_image = self._eval_image_seconds()
        spe = self.steps_per_epoch
        # Epoch ends at every multiple of spe from `step` (one pending there) up to, not including, `total`.
        ends = max(0, math.ceil(total / spe) - max(1, math.ceil(step / spe)))
        return ((total - step) * self.step_seconds + ends * (per_image * self.eval_images + self.save_seconds)
                + per_image * self.final_eval_images + 2 * self.save_seconds)

    def check_start(self, model: str) -> None:
        """Raises the too-short error when the budget is gone before the first step (loading, caching, planning)."""
        if self.spent() >= self.seconds - EXIT_SECONDS:
            raise TrainingError(f"--time {self.text} is too short for {model}: {self.spent():.1f} s went to loading "
                                f"and planning before its first step")

    def too_small(self, step: int, total: int, model: str) -> TrainingError | None:
        """The error of a first plan that leaves fewer than MIN_STEPS steps, or None."""
        if self.plans > 1 or total - step >= MIN_STEPS:
            return None
        need = self.spent() + self.cost(step, step + MIN_STEPS) + EXIT_SECONDS
        error = TrainingError(f"--time {self.text} is too short for {model}: {self.setup_seconds:.1f} s went to "
                              f"loading and planning and a step takes {1000 * self.step_seconds:,.1f} ms; "
                              f"{MIN_STEPS} steps and the final evaluation need about {math.ceil(need)} s")
        error.needed_seconds = math.ceil(need)  # what `auto` scales up to the whole budget it would need
        return error

    def record(self, total: int) -> dict[str, Any]:
        """What config.yaml keeps of the budget (time_plan)."""
        return {"budget": self.text, "budget_seconds": self.seconds, "setup_seconds": _round(self.setup_seconds),
                "step_seconds": _round(self.step_seconds, 6), "eval_image_seconds": _round(self.eval_image_seconds, 8),
                "steps": total, "epochs": round(total / self.steps_per_epoch, 4), "plans": self.plans,
                "max_steps": self.max_steps,
                "spent_before": _round(self.spent_before)}

    def describe(self, total: int) -> str:
        per_image = self._eval_image_seconds()
        return (f"time budget {self.text}: {self.setup_seconds:.1f} s to start; a step takes "
                f"{1000 * self.step_seconds:,.2f} ms, the final evaluation about "
                f"{per_image * self.final_eval_images:.1f} s -> {total:,} steps "
                f"({total / self.steps_per_epoch:.4g} epochs) "
                + (f"ending before the budget: the most a set this small gets ({recipes.MAX_SCALED_EPOCHS} epochs or its "
                   "recipe's own steps)"
                   if total == self.max_steps else "ending at the budget, re-estimated as it trains"))


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
