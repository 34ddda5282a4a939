"""Time to 99% on MNIST: trainforge's `--recipe speedrun` against the fastest published MNIST recipe, same device.

The peer is the "MNIST to 99% in 0.76 s on a laptop GPU" recipe, written here from its description in plain
PyTorch: conv(1->24, 5x5) -> max-pool 2 -> ReLU -> conv(24->32, 3x3) -> max-pool 2 -> ReLU -> fc 800->256 -> ReLU
-> fc 256->10; Adam lr 1e-2, betas (0.7, 0.9), one-cycle without momentum cycling, batch 256, one epoch, inputs
normalized with 0.1307 / 0.3081 and resident on the device as float tensors.

Both arms are timed the same way: from the first training step to the end of the test-set evaluation (trainforge's
`train_seconds`: the training loop including its per-epoch evaluation), with the device synchronized at both ends;
the one-time data load and a warm-up run of each arm (oneDNN/cuDNN kernel selection, allocator growth) are not
counted. Seeds alternate between the arms (peer seed 0, speedrun seed 0, peer seed 1, ...) so that the load of a
shared machine falls on both alike. The ratio is median peer time / median speedrun time.

Usage:
  python benchmarks/time_to_accuracy.py                       # 5 seeds each on the default device
  python benchmarks/time_to_accuracy.py --device cuda --seeds 10 --json
  python benchmarks/time_to_accuracy.py --quick               # a small setting: 2 seeds on 4,096 images
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# trainforge before torch: it configures MKL threading, which must happen before torch loads MKL
# (see trainforge/__init__.py).
import trainforge  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from trainforge.data import DataBundle, ImageSet, balanced_subset, load_data  # noqa: E402
from trainforge.models import build_classifier  # noqa: E402
from trainforge.train.device import resolve_device, synchronize  # noqa: E402
from trainforge.train.recipes import RECIPES  # noqa: E402

PEER = dict(batch_size=256, lr=1e-2, betas=(0.7, 0.9), epochs=1, mean=0.1307, std=0.3081)


def peer_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 24, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(24, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def train_peer(bundle: DataBundle, seed: int, device: torch.device, fraction: float = 1.0) -> dict[str, float]:
    """One run of the peer recipe; test accuracy and seconds from its first step to the end of evaluation."""
    torch.manual_seed(seed)
    # The recipe keeps the whole set on the device as normalized floats, prepared before the clock starts.
    def prepare(images: torch.Tensor) -> torch.Tensor:
        return ((images.to(device).float() / 255 - PEER["mean"]) / PEER["std"]).contiguous()

    x_train, y_train = prepare(bundle.train.images), bundle.train.labels.to(device)
    x_test, y_test = prepare(bundle.test.images), bundle.test.labels.to(device)
    model = peer_net().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=PEER["lr"], betas=PEER["betas"])
    batch = PEER["batch_size"]
    steps = max(1, round(fraction * PEER["epochs"] * -(-len(y_train) // batch)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PEER["lr"], total_steps=steps,
                                                    cycle_momentum=False)
    synchronize(device)
    start = time.perf_counter()
    order = torch.randperm(len(y_train), device=device)
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.int64)
    with torch.inference_mode():
        for i in range(0, len(y_test), 2000):
            correct += (model(x_test[i:i + 2000]).argmax(1) == y_test[i:i + 2000]).sum()
    acc = correct.item() / len(y_test)
    synchronize(device)
    return {"test_acc": acc, "train_seconds": time.perf_counter() - start}


def train_speedrun(bundle: DataBundle, seed: int, device: torch.device, out: Path,
                   epochs: float | None = None) -> dict[str, float]:
    """One run of `trainforge train --recipe speedrun` through the Python API (data passed in, already loaded)."""
    config = {"recipe": "speedrun", "seed": seed, "device": str(device), "out": str(out), "tensorboard": False}
    if epochs is not None:
        config["epochs"] = epochs
    result = trainforge.train(config, data=bundle, progress=False)
    return {"test_acc": result.test_acc, "train_seconds": result.train_seconds}


def training_gflop(model: nn.Module, images: torch.Tensor, steps: int) -> float:
    """Forward + backward GFLOP of `steps` steps on batches like `images` (torch's FLOP counter, convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * steps / 1e9


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    accs = [r["test_acc"] for r in runs]
    times = [r["train_seconds"] for r in runs]
    return {"acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_min": min(accs), "seconds_median": statistics.median(times), "seconds": times, "accs": accs}


def quick_bundle(bundle: DataBundle, train_size: int, test_size: int) -> DataBundle:
    idx = balanced_subset(bundle.train.labels, train_size, 0)
    return DataBundle(bundle.name, ImageSet(bundle.train.images[idx], bundle.train.labels[idx], bundle.classes),
                      ImageSet(bundle.test.images[:test_size], bundle.test.labels[:test_size], bundle.classes),
                      bundle.mean, bundle.std)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (both arms use it)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per arm, seeds 0..N-1 (default 5; 2 with --quick)")
    parser.add_argument("--data-dir", default=None, help="root of the built-in data sets (default: $TRAINFORGE_DATA)")
    parser.add_argument("--quick", action="store_true",
                        help="a small setting for tests: 4,096 training and 1,000 test images")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both arms (default: torch's own choice). On a CPU that other jobs "
                             "also use, fewer threads than cores avoid threads waiting on each other")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")

    device = resolve_device(args.device)
    bundle = load_data("mnist", args.data_dir)
    if args.quick:
        bundle = quick_bundle(bundle, 4096, 1000)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print

    peer_runs: list[dict[str, float]] = []
    speed_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        # Warm-up: a few percent of an epoch of each arm, untimed, so that one-time costs fall outside the clock.
        train_peer(bundle, 0, device, fraction=0.05)
        train_speedrun(bundle, 0, device, Path(tmp) / "warmup", epochs=0.05)
        for seed in range(args.seeds):
            peer_runs.append(train_peer(bundle, seed, device))
            say(f"peer      seed {seed}: {peer_runs[-1]['test_acc']:.4f} in {peer_runs[-1]['train_seconds']:.2f} s")
            speed_runs.append(train_speedrun(bundle, seed, device, Path(tmp) / f"speedrun-{seed}"))
            say(f"speedrun  seed {seed}: {speed_runs[-1]['test_acc']:.4f} in {speed_runs[-1]['train_seconds']:.2f} s")

    recipe = RECIPES["speedrun"]
    peer, speed = summarize(peer_runs), summarize(speed_runs)
    peer_steps = -(-len(bundle.train.labels) // PEER["batch_size"])
    speed_steps = math.ceil(recipe["epochs"] * -(-len(bundle.train.labels) // recipe["batch_size"]))
    peer_batch = (bundle.train.images[:PEER["batch_size"]].float() / 255 - PEER["mean"]) / PEER["std"]
    peer["train_gflop"] = training_gflop(peer_net(), peer_batch, peer_steps)
    speed["train_gflop"] = training_gflop(
        build_classifier(recipe["model"], len(bundle.classes), 1, 28, bundle.mean, bundle.std),
        bundle.train.images[:recipe["batch_size"]], speed_steps)
    report = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seeds": args.seeds, "quick": args.quick, "train_images": len(bundle.train.labels),
        "peer": peer, "speedrun": speed, "recipe": dict(recipe),
        "speedup": peer["seconds_median"] / speed["seconds_median"],
    }
    say(f"\n{'arm':10s} {'test acc (mean ± std, min)':>30s} {'median s':>10s} {'train GFLOP':>12s}")
    for name, s in (("peer", peer), ("speedrun", speed)):
        say(f"{name:10s} {100 * s['acc_mean']:>16.2f} ± {100 * s['acc_std']:.2f} %, {100 * s['acc_min']:.2f} "
            f"{s['seconds_median']:>10.2f} {s['train_gflop']:>12.1f}")
    say(f"speedrun is {report['speedup']:.2f}x faster than the peer (median training time, {args.seeds} seeds, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
