"""What `trainforge tune` buys over the recipe's defaults, on the same budget, and whether its best config reproduces.

Runs a study (CLI, SQLite, --workers processes) on a class-balanced MNIST subset, then, in this process:
  baseline   the model's recipe with its epochs capped at --max-epochs, scored on the same validation split;
  retrained  the best config file as written, re-trained (it must reproduce the study's best validation accuracy);
  test       both configs with holdout off: trained on the whole subset, measured on the MNIST test set.

Usage: PYTHONPATH=. python benchmarks/tune.py [--model mlp] [--trials 6] [--subset 5000] [--max-epochs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trainforge
from trainforge import config as cfg
from trainforge.train import recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    start = time.perf_counter()
    study = subprocess.run([sys.executable, "-m", "trainforge", "tune", "--model", args.model, "--trials",
                            str(args.trials), "--subset", str(args.subset), "--max-epochs", str(args.max_epochs),
                            "--workers", str(args.workers), "--out", str(work / "tune"), "--json"],
                           capture_output=True, text=True, check=True)
    study_seconds = time.perf_counter() - start
    summary = json.loads(study.stdout.strip().splitlines()[-1])

    best = cfg.load_file(cfg.TrainConfig, summary["config_path"])
    base = recipes.resolve(cfg.TrainConfig(model=args.model, subset=args.subset, holdout=True))
    baseline = dataclasses.replace(base, epochs=min(base.epochs, args.max_epochs))

    def run(config: cfg.TrainConfig, name: str, holdout: bool) -> float:
        config = dataclasses.replace(config, holdout=holdout, out=str(work / name), tensorboard=False)
        return trainforge.train(config, progress=False).test_acc

    result = {
        "model": args.model, "subset": args.subset, "trials": args.trials, "workers": args.workers,
        "max_epochs": args.max_epochs, "study_seconds": study_seconds,
        "complete": summary["n_complete"], "pruned": summary["n_pruned"],
        "best_params": summary["best_params"], "importances": summary["importances"],
        "best_val_acc": summary["best_value"],
        "retrained_val_acc": run(best, "retrained", True),
        "baseline_val_acc": run(baseline, "baseline", True),
        "best_test_acc": run(best, "best-test", False),
        "baseline_test_acc": run(baseline, "baseline-test", False),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
