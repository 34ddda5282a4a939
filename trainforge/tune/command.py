"""Search the training hyperparameters with Optuna, scored on a validation split of the training set.

Searched: learning rate (log scale, 10x either side of the recipe's), weight decay, batch size, epochs (1 to
--max-epochs), width of models that take one (mlp, cnn) and augmentation. A training flag you pass (e.g. --lr 0.1
or --epochs 2) fixes that value instead. The first trial is the recipe's own values, except that a weight decay
below 1e-6 (0 included) is 1e-6 and fractional epochs round up (within --max-epochs). Each trial trains on all but
a seeded, stratified --val-fraction of the training images and is scored on that held-out part; the test set is
never used. A median pruner stops trials whose validation accuracy after an epoch is below the median of earlier
trials at that epoch.

The study is stored in SQLite (<out>/study.db) by default: run the same command again to resume an interrupted
study (finished trials are kept; --trials is the total), and --workers K runs K processes on it. Any SQLAlchemy
URL works with --storage, so workers on several machines can share one PostgreSQL database (its driver: pip install
-e '.[postgres]'). A trial whose worker died (killed, machine lost) is failed once its heartbeat has been silent
for 2 x --heartbeat seconds, and run again by the next worker that starts a trial.

The best trial's full config is written to <out>/<study>-best.yaml; `trainforge train --config` on it re-trains
to the same validation accuracy (add --no-holdout to train on all training images and test on the test set).

Examples:
  trainforge tune --data mnist --model mlp --trials 20 --subset 5000
  trainforge tune --model cnn --trials 50 --workers 2 --budget-minutes 30
  trainforge tune --model cnn --trials 200 --storage postgresql://user:pw@db-host:5432/optuna --study mnist-cnn
  trainforge train --config runs/tune/mnist-mlp-best.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import config as cfg
from .storage import HEARTBEAT_SECONDS

# TrainConfig fields that tune owns or that clash with its own flags.
# A trial's length is its epochs; --budget-minutes bounds the whole study.
SKIPPED_FIELDS = ("holdout", "out", "workers", "tensorboard", "time")


def configure(parser: argparse.ArgumentParser) -> None:
    study = parser.add_argument_group("study")
    study.add_argument("--trials", type=int, default=20, metavar="N",
                       help="finished (complete or pruned) trials the study should hold in total (default: 20)")
    study.add_argument("--workers", type=int, default=1, metavar="K",
                       help="processes on this machine that run trials of the study side by side (default: 1)")
    study.add_argument("--storage", metavar="URL",
                       help="SQLAlchemy URL of the study storage (default: sqlite:///<out>/study.db)")
    study.add_argument("--study", metavar="NAME", help="study name (default: <data>-<model>)")
    study.add_argument("--budget-minutes", type=float, metavar="T",
                       help="stop starting new trials after T minutes")
    study.add_argument("--max-epochs", type=int, metavar="N",
                       help="largest number of epochs searched (default: the recipe's epochs)")
    study.add_argument("--no-prune", dest="prune", action="store_false",
                       help="let every trial run all its epochs")
    study.add_argument("--heartbeat", type=int, default=HEARTBEAT_SECONDS, metavar="S",
                       help="seconds between a running trial's heartbeats; a trial silent for twice that is failed "
                            f"and run again (default: {HEARTBEAT_SECONDS})")
    study.add_argument("--out", default="runs/tune", metavar="DIR",
                       help="directory of the trial runs, the default SQLite study and the best config "
                            "(default: runs/tune)")
    cfg.add_arguments(parser.add_argument_group("training options (fixed for every trial)"), cfg.TrainConfig,
                      skip=SKIPPED_FIELDS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .study import TuneSettings, run_study, summarize

    fixed = {k: v for k, v in cfg.typed_options(args, cfg.TrainConfig).items() if k not in SKIPPED_FIELDS}
    settings = TuneSettings(fixed=fixed, trials=args.trials, workers=args.workers, out=args.out,
                            storage=args.storage, study=args.study, budget_minutes=args.budget_minutes,
                            max_epochs=args.max_epochs, prune=args.prune, heartbeat=args.heartbeat)
    study = run_study(settings, progress=not (args.quiet or args.json))
    summary = summarize(study, settings)
    if not (args.quiet or args.json):
        _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped output has no width to fit; rich's 80-column default would truncate every column of the table.
        console = Console(width=160)
    table = Table(title=f"study {summary['study']}")
    params = sorted({name for row in summary["trials"] for name in row["params"]})
    for column in ("#", "state", "val acc", "epochs run", "seconds", *params):
        table.add_column(column, justify="right" if column not in ("state", "augment") else "left")
    for row in summary["trials"]:
        marker = " *" if row["number"] == summary["best_trial"] else ""
        table.add_row(str(row["number"]) + marker, row["state"],
                      "" if row["val_acc"] is None else f"{row['val_acc']:.4f}", str(row["epochs_run"]),
                      "" if row["seconds"] is None else f"{row['seconds']:.1f}",
                      *[_format(row["params"].get(name)) for name in params])
    console.print(table)
    console.print(f"{summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed, "
                  f"{summary['n_running']} running")
    if summary["importances"]:
        ranked = ", ".join(f"{name} {value:.2f}" for name, value in summary["importances"].items())
        console.print(f"parameter importance: {ranked}")
    if summary["importances_note"]:
        console.print(f"parameter importance: {summary['importances_note']}")
    if summary["best_trial"] is None:
        console.print("no trial completed: no best config yet")
        return
    console.print(f"best: trial {summary['best_trial']}, validation accuracy {summary['best_value']:.4f}")
    console.print(f"best config: {summary['config_path']}  (re-train: trainforge train --config "
                  f"{summary['config_path']})", soft_wrap=True)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
