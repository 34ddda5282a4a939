"""A folder of labelled images to a deployed, measured model within one time budget for the whole command.

  trainforge auto DATA --time 10m [--memory-budget 4G] [--max-latency-ms X] [--device D] [--out DIR]
  trainforge auto --resume DIR

DATA is an image folder (one sub-folder per class, or train/ and val/ sub-folders) or a built-in set. In order, on
one clock that starts with the process:
  plan    the data checked and split once: the folder's val/, or a seeded stratified 20% held out (file names, or a
          built-in set's seed and indices, in split.json); the held-out part is not looked at until the winner is
          trained. The candidates that fit the data; with --max-latency-ms, those whose architecture, exported to
          ONNX untrained (weights do not change the time), takes longer than X ms per image at batch 1 in ONNX
          Runtime on this machine's CPU are dropped. The plan is printed: stages and their shares, what is skipped
          when time runs short.
  search  each candidate's short trial on a validation part of the training images (the measured choice of
          `train --time`, in an Optuna study: study.db in --out, or --storage/--study to share one as `tune` does).
  train   the winner trained on all the training images for the rest of the training share.
  deploy  ONNX export (fp32, parity-checked on the held-out part); int8 static quantization kept only if it loses
          at most 0.5 points of held-out accuracy and agrees with fp32 on 98% of the images; batch-1 latency
          (p50/p99) and best-batch throughput of the deployed file, on the CPU and on CUDA where present.
  report  report.html: accuracy, per-class precision and recall with 95% intervals, confusion matrix, worst
          images, calibration (a temperature fitted on the validation part, kept if it lowers the held-out
          calibration error), the plan against the actual time, the candidates.

--out DIR (default runs/<timestamp>) then holds: run/ (the winner's run directory), model-int8.onnx or
model-fp32.onnx (the one deployed), plan.json, split.json, study.db, search/ (the trials' runs), report.html and
auto.json (every decision and figure). The last line printed is the `trainforge serve` command of the deployed file
(with --json, the field serve_command of the final JSON object).

Interrupted (Ctrl-C, a kill): `trainforge auto --resume DIR` continues: finished trials are kept, the final training
resumes from its checkpoint, and the time already spent counts against the budget.

Examples:
  trainforge auto ./photos --time 10m
  trainforge auto ./photos --time 5m --max-latency-ms 5 --out runs/photos
  trainforge auto --resume runs/photos
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .. import config as cfg
from ..errors import ConfigError
from ..train import budget
from .pipeline import AutoOptions, open_record, run_stages, stderr_say


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", metavar="DATA",
                        help="image folder (one sub-folder per class, or train/ and val/) or built-in data set")
    parser.add_argument("--time", metavar="DURATION",
                        help=f"budget of the whole command: {cfg.DURATION_FORMS}")
    parser.add_argument("--memory-budget", metavar="SIZE", help="memory every stage may use, e.g. 4G (K/M/G/T)")
    parser.add_argument("--max-latency-ms", type=float, metavar="X",
                        help="drop candidates whose architecture takes longer than X ms per image at batch 1 "
                             "(exported to ONNX, timed in ONNX Runtime on this machine's CPU before the search)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: runs/<timestamp>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted auto run in DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (named in auto.json) instead of stopping at them")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage of the search's study, as `tune --storage` (default: study.db in --out)")
    parser.add_argument("--study", metavar="NAME", help="the study's name in --storage (default: auto-<out name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the trials and training (default: 0)")
    parser.add_argument("--data-dir", help="root of the built-in data sets")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .. import runs

    clock, part_clock = budget.command_clocks()
    options = _options(args)
    say = stderr_say(args.quiet or args.json)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = runs.acquire_lock(out)
    try:
        record = open_record(options, resume=bool(args.resume), overwrite=args.overwrite, clock=clock)
        if record.values["finished"]:
            say(f"{out}: this run finished; nothing to resume")
        else:
            with temporaries_in(out):
                run_stages(record, options, progress=not (args.quiet or args.json), say=say, part_clock=part_clock)
    finally:
        lock.release()
    values = record.values
    if not (args.quiet or args.json):
        print(_summary(values))
        print(values["serve_command"])
    return values


@contextlib.contextmanager
def temporaries_in(out: Path) -> Iterator[None]:
    """Temporary files (the export's, ONNX Runtime's quantizer's, the latency probes') go to OUT/.tmp, removed at the
    end, so that nothing is written outside --out but the caches; for this process and the ones it starts."""
    scratch = out / ".tmp"
    scratch.mkdir(exist_ok=True)
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(scratch), str(scratch)
    try:
        yield
    finally:
        tempfile.tempdir = before[0]
        if before[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before[1]
        shutil.rmtree(scratch, ignore_errors=True)


def _options(args: argparse.Namespace) -> AutoOptions:
    """The options typed, or with --resume those the run was started with."""
    import dataclasses
    import json
    from pathlib import Path

    from .. import runs
    from .pipeline import AUTO_FILE

    if args.resume:
        typed = [f"{flag}" for flag, value in (("DATA", args.data), ("--time", args.time), ("--out", args.out))
                 if value is not None]
        if typed:
            raise ConfigError(f"--resume {args.resume} continues with the options it was started with; drop "
                              f"{', '.join(typed)}")
        path = Path(args.resume) / AUTO_FILE
        if not path.is_file():
            raise ConfigError(f"--resume {args.resume}: no {AUTO_FILE} there: not a run of trainforge auto")
        saved = json.loads(path.read_text())["options"]
        return AutoOptions(**{**saved, "out": args.resume})
    if args.data is None:
        raise ConfigError("auto needs DATA (an image folder or a built-in data set), or --resume DIR")
    if args.time is None:
        raise ConfigError("auto needs --time, the budget of the whole command (e.g. 10m)")
    try:
        cfg.parse_duration(args.time)
    except ValueError as exc:
        raise ConfigError(f"--time {exc}") from None
    if args.max_latency_ms is not None and args.max_latency_ms <= 0:
        raise ConfigError(f"--max-latency-ms must be > 0, got {args.max_latency_ms:g}")
    out = args.out or str(runs.default_run_dir())
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AutoOptions)
              if f.name not in ("out",) and hasattr(args, f.name)}
    return AutoOptions(**{**values, "out": out})


def _summary(values: dict[str, Any]) -> str:
    dep = values["deploy"]
    cpu = next(s for s in dep["speed"] if s["device"] == "cpu")
    return (f"{values['winner']}: held-out accuracy {dep['heldout_acc']:.4f} ({dep['heldout_images']:,} images); "
            f"deployed {dep['deployed']} ({'int8' if dep['int8']['kept'] else 'fp32'}), CPU batch-1 p50 "
            f"{cpu['latency_ms_p50']:.2f} ms, {cpu['throughput']:,.0f} images/s at batch {cpu['best_batch']}; "
            f"{values['elapsed_s']:.0f} s of {values['budget_seconds']:.0f}; report {values['options']['out']}/"
            f"report.html")
