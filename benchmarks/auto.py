"""`trainforge auto`'s "Done when" measurements (issue 28), each whole-process, as a user would run it
(benchmarks/RESULTS.md, "auto"):

  python benchmarks/auto.py --work /tmp/auto-bench --data-dir /work/shared/data            # every case
  python benchmarks/auto.py --work /tmp/auto-bench --only digits resume --scale 0.25      # a quick check

Cases:
  photo     the benchmark photo folder (make_photo_folder.py: 3,000 training JPEGs of 500x375, 1,000 in val/):
            `auto --time 5m` ends within 5 min + 10 s and writes every file; the printed serve command is started
            and classifies a val/ image; val/ accuracy >= today's default `train --data DIR` (run here too).
  digits    scikit-learn's digits as a folder: `auto --time 2m` reaches >= 0.97 held out and picks a scratch model.
  fiveshot  5 digits per class in train/, the other 1,747 in val/: `auto --time 1m` ends in time, val/ accuracy >=
            the better of `fewshot --shots 5` and `train` on the same folder.
  memory    `auto --time 2m --memory-budget 4G` on the photo folder: the whole process tree's peak RSS (sampled
            from /proc every 0.2 s) stays under 4 GiB.
  latency   built-in MNIST with --max-latency-ms between the winner's measured batch-1 latency and the next faster
            candidate's: the pick changes (then the digits and photo folders, where the winner was their fastest
            candidate, which no limit excludes alone).
  resume    the photo folder `auto --time 5m`, SIGKILLed once its first trial finished, then `--resume`: the two
            processes' wall times together stay within 5 min + 10%.
--scale multiplies every budget (0.25: a quick check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from process_tree import tree_rss  # noqa: E402  (beside this script)
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}




def trainforge(*args: str, kill_when: "callable | None" = None) -> dict:
    """Runs `trainforge ARGS`: wall seconds, the process tree's peak RSS, return code, stdout and stderr; with
    `kill_when`, SIGKILLs it once that returns True (polled every 0.2 s)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "trainforge", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    out, err = proc.communicate()
    return {"wall_s": round(time.monotonic() - started, 1), "peak_tree_mb": round(peak / 2 ** 20),
            "rc": proc.returncode, "stdout": out, "stderr": err}


def auto(data: Path | str, budget: str, out: Path, *extra: str, kill_when=None) -> dict:
    row = trainforge("auto", str(data), "--time", budget, "--out", str(out), "--overwrite", "--json", *extra,
                     kill_when=kill_when)
    if row["rc"] == 0:
        row["result"] = json.loads(row["stdout"].splitlines()[-1])
    elif kill_when is None:
        raise SystemExit(f"auto {data} failed:\n{row['stderr'][-2000:]}")
    return row


def summary(row: dict) -> dict:
    r = row.get("result", {})
    dep = r.get("deploy", {})
    return {"wall_s": row["wall_s"], "peak_tree_mb": row["peak_tree_mb"], "winner": r.get("winner"),
            "heldout_acc": dep.get("heldout_acc"), "deployed": dep.get("deployed"),
            "int8": (dep.get("int8") or {}).get("why"), "speed": dep.get("speed"),
            "elapsed_s": r.get("elapsed_s"), "serve_command": r.get("serve_command")}


def default_train(data: Path, out: Path) -> dict:
    row = trainforge("train", "--data", str(data), "--out", str(out), "--overwrite", "--no-tensorboard", "--json")
    if row["rc"] != 0:
        raise SystemExit(f"train failed:\n{row['stderr'][-2000:]}")
    return {"wall_s": row["wall_s"], "val_acc": json.loads(row["stdout"].splitlines()[-1])["test_acc"]}


def serve_and_classify(command: str, image: Path) -> dict:
    """Starts the printed serve command on a free port and classifies `image` through it."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "trainforge", *command.split()[1:], "--port", str(port), "--quiet"]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"serve did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": image.read_bytes()}, timeout=30).json()
        return {"image": str(image), "true": image.parent.name, "answer": answer["predictions"][0]}
    finally:
        proc.terminate()
        proc.wait(30)


def digits_folder(root: Path, train_per_class: int | None = None) -> Path:
    """scikit-learn's digits as PNGs; with `train_per_class`, that many in train/ and the rest in val/."""
    import torch
    from sklearn.datasets import load_digits
    from torchvision.io import write_png

    if root.is_dir():
        return root
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8)
    seen: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(pixels, digits.target.tolist())):
        seen[label] = seen.get(label, 0) + 1
        part = "" if train_per_class is None else ("train" if seen[label] <= train_per_class else "val")
        folder = root / part / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(image[None], str(folder / f"{i}.png"))
    return root


def seconds(text: str, scale: float) -> str:
    value = float(text[:-1]) * {"s": 1, "m": 60}[text[-1]] * scale
    return f"{value:.0f}s"


def case_photo(work: Path, photos: Path, scale: float, default_run: Path | None) -> dict:
    budget = seconds("5m", scale)
    row = auto(photos, budget, work / "photo")
    files = sorted(p.name for p in (work / "photo").iterdir())
    image = next((photos / "val").rglob("*.jpg"))
    served = serve_and_classify(row["result"]["serve_command"], image)
    if default_run is None:
        default = default_train(photos, work / "photo-default")
    else:  # the same default run, measured by benchmarks/time_budget.py on this folder: 8+ minutes not repeated
        default = {"run_dir": str(default_run),
                   "val_acc": json.loads((default_run / "summary.json").read_text())["test_acc"]}
    limit = float(budget[:-1]) + 10
    return {"case": "photo", **summary(row), "files": files, "served": served, "default_train": default,
            "ends_in_time": row["wall_s"] <= limit, "at_least_default": row["result"]["deploy"]["heldout_acc"]
            >= default["val_acc"]}


def case_digits(work: Path, scale: float) -> dict:
    row = auto(digits_folder(work / "digits"), seconds("2m", scale), work / "digits-out")
    winner = next(c for c in row["result"]["candidates"] if c["name"] == row["result"]["winner"])
    return {"case": "digits", **summary(row), "scratch": winner["kind"] == "scratch",
            "passes": row["result"]["deploy"]["heldout_acc"] >= 0.97 and winner["kind"] == "scratch"}


def case_fiveshot(work: Path, scale: float) -> dict:
    folder = digits_folder(work / "fiveshot", train_per_class=5)
    budget = seconds("1m", scale)
    row = auto(folder, budget, work / "fiveshot-out")
    shutil.rmtree(work / "fiveshot-fewshot", ignore_errors=True)  # fewshot has no --overwrite
    few = trainforge("fewshot", "--from", "efficientnet_lite0", "--data", str(folder), "--shots", "5",
                     "--out", str(work / "fiveshot-fewshot"), "--json")
    plain = trainforge("train", "--data", str(folder), "--out", str(work / "fiveshot-train"), "--overwrite",
                       "--no-tensorboard", "--json")
    accs = {}
    for name, r in (("fewshot", few), ("train", plain)):
        accs[name] = json.loads(r["stdout"].splitlines()[-1]).get("test_acc") if r["rc"] == 0 else \
            r["stderr"].strip().splitlines()[-1]
    best = max(v for v in accs.values() if isinstance(v, float))
    return {"case": "fiveshot", **summary(row), "others": accs,
            "ends_in_time": row["wall_s"] <= float(budget[:-1]) + 10,
            "at_least_the_better": row["result"]["deploy"]["heldout_acc"] >= best}


def case_memory(work: Path, photos: Path, scale: float) -> dict:
    row = auto(photos, seconds("2m", scale), work / "memory", "--memory-budget", "4G")
    return {"case": "memory", **summary(row), "under_4g": row["peak_tree_mb"] <= 4096}


def case_latency(work: Path, photos: Path | None, scale: float) -> dict:
    """On built-in MNIST (whose fastest candidate is its default, the linear model), else on the digits and photo
    folders (where the winner may be the fastest candidate, which no limit can exclude alone): auto without a binding
    limit, then with one halfway between its winner's measured latency and the next faster candidate's."""
    tried = []
    for name, folder, budget in (("mnist", "mnist", "2m"), ("digits", digits_folder(work / "digits"), "2m"),
                                 ("photos", photos, "3m")):
        if folder is None:
            continue
        # A limit no candidate reaches: every candidate's latency is measured and recorded, none dropped.
        free = auto(folder, seconds(budget, scale), work / f"latency-{name}-free", "--max-latency-ms", "1000000")
        measured, winner = free["result"]["latency_filter"]["by_candidate"], free["result"]["winner"]
        tried.append({"data": name, "measured": measured, "free_winner": winner})
        faster = [ms for ms in measured.values() if ms < measured[winner]]
        if not faster:
            continue
        # Halfway between the winner and the next faster candidate: a latency measured again moves by a few percent.
        limit = (measured[winner] + max(faster)) / 2
        capped = auto(folder, seconds(budget, scale), work / f"latency-{name}-capped", "--max-latency-ms",
                      f"{limit:.4f}")["result"]
        return {"case": "latency", "tried": tried, "limit_ms": limit, "capped_winner": capped["winner"],
                "pick_changes": capped["winner"] != winner}
    return {"case": "latency", "tried": tried, "note": "each winner was its folder's fastest candidate"}


def case_resume(work: Path, photos: Path, scale: float) -> dict:
    budget = seconds("5m", scale)
    out = work / "resume"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's trials would meet the kill condition at once
    killed = auto(photos, budget, out, kill_when=lambda: any((out / "search").glob("*/summary.json")))
    resumed = trainforge("auto", "--resume", str(out), "--json")
    total = killed["wall_s"] + resumed["wall_s"]
    return {"case": "resume", "killed_after_s": killed["wall_s"], "killed_rc": killed["rc"], "resumed": summary(
        {**resumed, "result": json.loads(resumed["stdout"].splitlines()[-1]) if resumed["rc"] == 0 else {}}),
            "total_wall_s": round(total, 1), "within_budget_plus_10pct": total <= 1.1 * float(budget[:-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the data and outputs (default: a temporary one)")
    parser.add_argument("--data-dir", help="root of Fashion-MNIST, for the photo folder")
    parser.add_argument("--only", nargs="+", choices=("photo", "digits", "fiveshot", "memory", "latency", "resume"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every budget (quick checks)")
    parser.add_argument("--default-run", type=Path, help="photo: a finished `train --data PHOTOS` run directory to "
                                                          "compare with, instead of training the default here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="auto-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.only or ["photo", "digits", "fiveshot", "memory", "latency", "resume"]
    photos = None
    if {"photo", "memory", "resume", "latency"} & set(wanted):
        from make_photo_folder import make_photo_folder

        photos = Path(make_photo_folder(work / "photos", data_dir=args.data_dir))
    cases = {"photo": lambda: case_photo(work, photos, args.scale, args.default_run), "digits": lambda: case_digits(work, args.scale),
             "fiveshot": lambda: case_fiveshot(work, args.scale),
             "memory": lambda: case_memory(work, photos, args.scale),
             "latency": lambda: case_latency(work, photos, args.scale), "resume": lambda: case_resume(work, photos, args.scale)}
    for name in wanted:
        print(json.dumps(cases[name]()), flush=True)


if __name__ == "__main__":
    main()
