"""Does `trainforge hw --measure` report a matmul ceiling a plain torch.matmul timing loop agrees with?

Each round times `probe.measure_matmul` (best of a few blocks) and, right after it, the loop anyone would write
(warm-up, then N matmuls between two perf_counter calls), on the same device, dtype and size, and prints their
ratio. A ceiling is an upper bound: the acceptance criterion is that no round's plain loop beats it by more than
10% (ratio >= 0.9); on an idle machine the ratio should also stay below 1.3 (under load the plain loop, one block,
is slowed where the best of five is not). Rounds are back to back so that a shared machine's load affects both
sides alike.

Usage: python benchmarks/hw_ceiling.py [--rounds 5] [--device cpu] [--dtype fp32 bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainforge.hardware import probe
from trainforge.train.device import synchronize


def plain_loop(device: torch.device, dtype: str, n: int, iterations: int) -> float:
    """FLOP/s of `iterations` back-to-back n x n matmuls, timed as a whole."""
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16}[dtype]
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    torch.matmul(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        torch.matmul(a, b)
    synchronize(device)
    return 2 * n ** 3 * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    n = probe.MATMUL_SIZE[device.type]
    print(f"device {device}, {n}x{n} matmuls, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in args.dtype:
        ratios = []
        for r in range(args.rounds):
            ceiling = probe.measure_matmul(device, dtype)
            plain = plain_loop(device, dtype, n, args.iterations)
            ratios.append(ceiling / plain)
            print(f"  {dtype} round {r + 1}: ceiling {ceiling / 1e9:8.1f} GFLOP/s, plain loop {plain / 1e9:8.1f} "
                  f"GFLOP/s, ratio {ratios[-1]:.2f}")
        bounded = sum(x >= 0.9 for x in ratios)
        close = sum(x < 1.3 for x in ratios)
        print(f"{dtype}: median ratio {statistics.median(ratios):.2f}; {bounded}/{len(ratios)} rounds with the "
              f"ceiling at least 0.9x the plain loop, {close}/{len(ratios)} below 1.3x")


if __name__ == "__main__":
    main()
