"""--time and recipes scaled to the data, measured whole-process with /usr/bin/time (benchmarks/RESULTS.md, "Time
budgets").

Each case runs `trainforge train` as a user would, once with --time and once without (or per seed), and reports the
wall time of the whole process, its peak RSS and the test accuracy from the run's summary.json:

  python benchmarks/time_budget.py --data-dir /work/shared/data                 # every case
  python benchmarks/time_budget.py --data-dir /work/shared/data --only mnist-reference
  python benchmarks/time_budget.py --folder /tmp/photos --only folder           # a folder with train/ and val/

Cases: mnist-cnn (--recipe cnn --time 60s: ends within 70 s, at least as accurate as --recipe cnn),
mnist-reference (--recipe reference --time 20s: within 30 s, at least as accurate), fashion-subset (--subset 1000,
the default and --model cnn, seeds 0-2: mean >= 0.80 and >= 0.78), folder (the default once, then --time 2m for seeds
0-2: each within 130 s, their mean val/ accuracy within 2 points of the default's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path) -> dict:
    """`trainforge train ARGS --out OUT` under /usr/bin/time -v: wall seconds, peak RSS, and the run's summary."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "trainforge", "train", *args, "--out", str(out),
           "--overwrite", "--no-tensorboard", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    seconds = int(wall[1] or 0) * 3600 + int(wall[2]) * 60 + float(wall[3])
    summary = json.loads((out / "summary.json").read_text())
    plan = _time_plan(out)
    row = {"args": " ".join(args), "wall_s": round(seconds, 1), "peak_rss_mb": round(int(rss[1]) / 1024),
           "test_acc": summary["test_acc"], "steps": summary["steps"], "epochs": round(summary["epochs"], 3)}
    if plan:
        row.update(step_ms=round(1000 * plan["step_seconds"], 2), setup_s=plan["setup_seconds"], plans=plan["plans"])
    print(json.dumps(row), flush=True)
    return row


def _time_plan(out: Path) -> dict | None:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text()).get("time_plan")


def with_and_without(common: list[str], budget: str, limit: float, tmp: Path, name: str) -> dict:
    without = run(common, tmp / f"{name}-plain")
    timed = run([*common, "--time", budget], tmp / f"{name}-time")
    return {"case": name, "without": without, "with_time": timed, "limit_s": limit,
            "ends_in_time": timed["wall_s"] <= limit, "at_least_as_accurate": timed["test_acc"] >= without["test_acc"]}


def seeds(common: list[str], tmp: Path, name: str, floor: float) -> dict:
    rows = [run([*common, "--seed", str(s)], tmp / f"{name}-{s}") for s in range(3)]
    mean = sum(r["test_acc"] for r in rows) / len(rows)
    return {"case": name, "runs": rows, "mean_test_acc": round(mean, 4), "floor": floor, "passes": mean >= floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="root of MNIST and Fashion-MNIST")
    parser.add_argument("--folder", help="a photo folder with train/ and val/ (benchmarks/make_photo_folder.py)")
    parser.add_argument("--work", help="keep the runs here (default: a temporary folder); benchmarks/auto.py "
                                       "--default-run takes WORK/folder-default")
    parser.add_argument("--reuse-default", action="store_true",
                        help="folder: take the default run already in WORK/folder-default instead of training it again")
    parser.add_argument("--only", nargs="+", choices=("mnist-cnn", "mnist-reference", "fashion-subset", "folder"))
    args = parser.parse_args()
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(args.work or tmp_name)
        chosen = set(args.only or ("mnist-cnn", "mnist-reference", "fashion-subset", "folder" if args.folder else ""))
        if "mnist-reference" in chosen:
            results.append(with_and_without(["--recipe", "reference", *data], "20s", 30, tmp, "mnist-reference"))
        if "mnist-cnn" in chosen:
            results.append(with_and_without(["--recipe", "cnn", *data], "60s", 70, tmp, "mnist-cnn"))
        if "fashion-subset" in chosen:
            fashion = ["--data", "fashion-mnist", "--subset", "1000", *data]
            results.append(seeds(fashion, tmp, "fashion-subset-default", 0.80))
            results.append(seeds([*fashion, "--model", "cnn"], tmp, "fashion-subset-cnn", 0.78))
        if "folder" in chosen:
            finished = tmp / "folder-default" / "summary.json"
            if args.reuse_default and finished.is_file():  # 8-18 minutes on 2 cores: not trained twice
                default = {"args": "--data " + args.folder, "reused": str(finished.parent),
                           "test_acc": json.loads(finished.read_text())["test_acc"]}
            else:
                default = run(["--data", args.folder], tmp / "folder-default")
            timed = seeds(["--data", args.folder, "--time", "2m"], tmp, "folder-time-2m", 0.0)
            timed["ends_in_time"] = all(r["wall_s"] <= 130 for r in timed["runs"])
            timed["within_2_points"] = timed["mean_test_acc"] >= default["test_acc"] - 0.02
            results.append({"case": "folder-default", "runs": [default]})
            results.append(timed)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
