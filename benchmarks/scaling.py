"""How training throughput scales with the number of processes (`trainforge train --nproc N`).

For each workload and each N, runs `trainforge train --nproc N` as a user would (N = 1 is the plain single process,
the baseline) and reads the run's own throughput from its --json summary: samples per second over the training loop
(per-epoch evaluation included, process start-up and data loading not). The global batch is the same for every N,
so every N does the same work. Scaling efficiency is throughput_N / (N x throughput_1): 1.0 is perfect scaling;
"efficiency vs best 1-process" divides by the fastest single-process row instead (see --single-threads).

Rounds interleave the process counts (1, 2, ..., 1, 2, ...) so that the load of a shared machine falls on all of
them alike; the median over rounds is reported. On the CPU the processes share the cores (each gets cores // N
threads) and talk over gloo; on a machine with N GPUs pass --device cuda (NCCL, one GPU per process).

`--single-threads K` adds a row for one process limited to K threads (e.g. the share each of N processes gets): on
a CPU whose cores other jobs also use, a process with many threads can be far slower than one with few (its threads
wait on each other), and that row shows how much of a speed-up is that effect rather than the processes.

Usage: python benchmarks/scaling.py [--nproc 1 2] [--workloads reference cnn] [--rounds 3] [--device cpu]
                                  [--single-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Two ends of the range: a tiny model whose steps are mostly gradient exchange, and a CNN whose steps are compute.
WORKLOADS: dict[str, list[str]] = {
    "reference": ["--recipe", "reference", "--epochs", "2"],
    "cnn": ["--recipe", "cnn", "--epochs", "1", "--subset", "12000"],
}


def throughput(workload: str, nproc: int, device: str, out: Path, threads: int | None = None) -> dict:
    """The --json summary of one `trainforge train --nproc N` run of `workload` (one with `threads` threads)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "trainforge", "train", "--nproc", str(nproc), *WORKLOADS[workload],
           "--device", device, "--out", str(out), "--no-tensorboard", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts; 1 is the baseline")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--single-threads", type=int, nargs="*", default=[], metavar="K",
                        help="also time one process limited to K threads")
    args = parser.parse_args()
    # (processes, threads of a single process or None for the default): the baseline is (1, None).
    configs = [(n, None) for n in sorted({1, *args.nproc})] + [(1, k) for k in args.single_threads]

    import torch

    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPU cores, process counts "
          f"{sorted({1, *args.nproc})}, {args.rounds} interleaved rounds, median reported")
    print("| workload | processes | samples/s (median) | rounds | speed-up | scaling efficiency | "
          "efficiency vs best 1-process | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            runs: dict[tuple[int, int | None], list[dict]] = {c: [] for c in configs}
            for r in range(args.rounds):
                for n, threads in configs:
                    out = Path(tmp) / f"{workload}-{n}-{threads}-{r}"
                    runs[n, threads].append(throughput(workload, n, args.device, out, threads))
            medians = {c: statistics.median(s["samples_per_second"] for s in summaries)
                       for c, summaries in runs.items()}
            base = medians[1, None]
            best_single = max(rate for (n, _), rate in medians.items() if n == 1)
            for (n, threads), summaries in runs.items():
                rates = [s["samples_per_second"] for s in summaries]
                assert all(s["world_size"] == n for s in summaries)
                label = f"{n}" if threads is None else f"1 ({threads} thread{'s' * (threads > 1)})"
                efficiency = f"{medians[n, threads] / (n * base):.2f}" if threads is None else "-"
                print(f"| {workload} | {label} | {medians[n, threads]:,.0f} | {', '.join(f'{x:,.0f}' for x in rates)}"
                      f" | {medians[n, threads] / base:.2f}x | {efficiency} | "
                      f"{medians[n, threads] / (n * best_single):.2f} | "
                      f"{statistics.median(s['test_acc'] for s in summaries):.4f} |", flush=True)


if __name__ == "__main__":
    main()
