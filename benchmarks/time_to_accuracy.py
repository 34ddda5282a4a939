"""Time to accuracy: trainforge's recipe against a published plain-PyTorch recipe, same data, same device, one run.

`--data mnist` (time to 99%): `--recipe speedrun` against the "MNIST to 99% in 0.76 s on a laptop GPU" recipe,
written here from its description: conv(1->24, 5x5) -> max-pool 2 -> ReLU -> conv(24->32, 3x3) -> max-pool 2 ->
ReLU -> fc 800->256 -> ReLU -> fc 256->10; Adam lr 1e-2, betas (0.7, 0.9), one-cycle without momentum cycling,
batch 256, one epoch.

`--data fashion-mnist` (time to 92%): `trainforge train --data fashion-mnist` (the data set's default model and
recipe) against the smallest PyTorch entry of the Fashion-MNIST benchmark table, @hardmaru's "2 Conv Layers net
<100K parameters" (92.47% published; github.com/hardmaru/pytorch_notebooks, pytorch_tiny_custom_mnist_adam.ipynb):
conv(1->32, 5x5, pad 2) -> ReLU -> max-pool 2 -> conv(32->64, 5x5, pad 2) -> ReLU -> max-pool 2 -> fc 3136->10;
Adam lr 1e-3 (constant), batch 1000, 30 epochs, no augmentation.

Both peers take inputs normalized with 0.1307 / 0.3081 (MNIST's statistics, as both published recipes do), resident
on the device as float tensors, and are evaluated on the test set after every epoch. Both arms are timed the same
way: from the first training step to the end of each epoch's test-set evaluation (trainforge's `train_seconds`),
with the device synchronized at both ends; the one-time data load and a warm-up run of each arm (oneDNN/cuDNN kernel
selection, allocator growth) are not counted. The time to the target accuracy is the elapsed time at the end of the
first epoch that reached it. Seeds alternate between the arms (peer seed 0, trainforge seed 0, peer seed 1, ...) so
that the load of a shared machine falls on both alike. The ratio is median peer time / median trainforge time. A
full run (3 seeds or more, not --quick) records trainforge's result in trainforge/train/measured.json, which
`trainforge models` shows.

Usage:
  python benchmarks/time_to_accuracy.py                       # MNIST, 5 seeds each on the default device
  python benchmarks/time_to_accuracy.py --data fashion-mnist --seeds 3
  python benchmarks/time_to_accuracy.py --device cuda --seeds 10 --json
  python benchmarks/time_to_accuracy.py --quick               # a small setting: 2 seeds on 4,096 images
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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
from trainforge.config import TrainConfig, to_dict as cfg_dict  # noqa: E402
from trainforge.train.recipes import RECIPES, record_measurement, resolve  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Peer:
    """A published plain-PyTorch recipe: its network, optimizer settings and the normalization it used."""

    name: str
    build: Callable[[], nn.Module]
    batch_size: int
    lr: float
    betas: tuple[float, float]
    epochs: int
    mean: float
    std: float
    onecycle: bool  # else a constant learning rate


def mnist_peer_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 24, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(24, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def fashion_peer_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )


# Per data set: the peer, trainforge's arm (a config for trainforge.train) and the accuracy whose time is compared.
SETUPS: dict[str, dict[str, Any]] = {
    "mnist": dict(peer=Peer("99% in 0.76 s", mnist_peer_net, 256, 1e-2, (0.7, 0.9), 1, 0.1307, 0.3081, True),
                  arm={"recipe": "speedrun"}, target=0.99),
    # Below the peer's published 92.47%, so that every seed of the peer can reach it.
    "fashion-mnist": dict(peer=Peer("hardmaru's 2-conv net (<100K parameters)", fashion_peer_net, 1000, 1e-3,
                                    (0.9, 0.999), 30, 0.1307, 0.3081, False),
                          arm={"data": "fashion-mnist"}, target=0.92),
}


def train_peer(peer: Peer, bundle: DataBundle, seed: int, device: torch.device, fraction: float = 1.0,
               epochs: int | None = None, target: float | None = None) -> dict[str, Any]:
    """One run of `peer`: test accuracy after each epoch, and seconds from its first step to the end of each epoch's
    evaluation; with `target`, it stops at the first epoch that reaches it."""
    torch.manual_seed(seed)
    # The recipe keeps the whole set on the device as normalized floats, prepared before the clock starts.
    def prepare(images: torch.Tensor) -> torch.Tensor:
        return ((images.to(device).float() / 255 - peer.mean) / peer.std).contiguous()

    x_train, y_train = prepare(bundle.train.images), bundle.train.labels.to(device)
    x_test, y_test = prepare(bundle.test.images), bundle.test.labels.to(device)
    model = peer.build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=peer.lr, betas=peer.betas)
    batch = peer.batch_size
    epochs = epochs or peer.epochs
    steps_per_epoch = -(-len(y_train) // batch)
    steps = max(1, round(fraction * epochs * steps_per_epoch))
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peer.lr, total_steps=steps, cycle_momentum=False)
                 if peer.onecycle else None)
    accs, seconds = [], []
    synchronize(device)
    start = time.perf_counter()
    for epoch_start in range(0, steps, steps_per_epoch):
        model.train()
        order = torch.randperm(len(y_train), device=device)
        for step in range(min(steps_per_epoch, steps - epoch_start)):
            idx = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        accs.append(accuracy(model, x_test, y_test))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if target is not None and accs[-1] >= target:
            break
    return {"test_acc": accs[-1], "train_seconds": seconds[-1], "epoch_accs": accs, "epoch_seconds": seconds}


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    with torch.inference_mode():
        for i in range(0, len(labels), 2000):
            correct += (model(images[i:i + 2000]).argmax(1) == labels[i:i + 2000]).sum()
    return correct.item() / len(labels)


def train_trainforge(arm: dict[str, Any], bundle: DataBundle, seed: int, device: torch.device, out: Path,
                     epochs: float | None = None) -> dict[str, Any]:
    """One run of trainforge's arm through the Python API (data passed in, already loaded), with its per-epoch
    accuracies and elapsed seconds from metrics.jsonl."""
    config = {**arm, "seed": seed, "device": str(device), "out": str(out), "tensorboard": False}
    if epochs is not None:
        config["epochs"] = epochs
    result = trainforge.train(config, data=bundle, progress=False)
    epochs_done = trainforge.runs.read_metrics(out)
    return {"test_acc": result.test_acc, "train_seconds": result.train_seconds,
            "epoch_accs": [m["test_acc"] for m in epochs_done],
            "epoch_seconds": [m["elapsed_seconds"] for m in epochs_done]}


def training_gflop(model: nn.Module, images: torch.Tensor, steps: int) -> float:
    """Forward + backward GFLOP of `steps` steps on batches like `images` (torch's FLOP counter, convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * steps / 1e9


def summarize(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    accs = [r["test_acc"] for r in runs]
    times = [r["train_seconds"] for r in runs]
    # Per run: the elapsed seconds at the end of the first epoch that reached the target (its evaluation included).
    to_target = [next((t for a, t in zip(r["epoch_accs"], r["epoch_seconds"]) if a >= target), None) for r in runs]
    reached = [t for t in to_target if t is not None]
    return {"acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_min": min(accs), "seconds_median": statistics.median(times), "seconds": times, "accs": accs,
            "epoch_accs": [r["epoch_accs"] for r in runs], "seconds_to_target": to_target, "reached": len(reached),
            "seconds_to_target_median": statistics.median(reached) if reached else None}


def quick_bundle(bundle: DataBundle, train_size: int, test_size: int) -> DataBundle:
    idx = balanced_subset(bundle.train.labels, train_size, 0)
    return DataBundle(bundle.name, ImageSet(bundle.train.images[idx], bundle.train.labels[idx], bundle.classes),
                      ImageSet(bundle.test.images[:test_size], bundle.test.labels[:test_size], bundle.classes),
                      bundle.mean, bundle.std)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist", choices=tuple(SETUPS), help="the data set (default mnist)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (both arms use it)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per arm, seeds 0..N-1 (default 5; 2 with --quick)")
    parser.add_argument("--data-dir", default=None, help="root of the built-in data sets (default: $TRAINFORGE_DATA)")
    parser.add_argument("--quick", action="store_true",
                        help="a small setting for tests: 4,096 training and 1,000 test images, at most 2 epochs of the "
                             "peer and 1 of trainforge's recipe; nothing is recorded")
    parser.add_argument("--peer-epochs", type=int, default=None,
                        help="cut the peer's published number of epochs to this (recorded in the report)")
    parser.add_argument("--peer-stops-at-target", action="store_true",
                        help="stop each peer run at the first epoch that reaches the target accuracy (its time to "
                             "the target is the same; its final accuracy is then that epoch's)")
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
    peer_epochs = SETUPS[args.data]["peer"].epochs
    args.peer_epochs = min(args.peer_epochs or peer_epochs, 2 if args.quick else peer_epochs)
    return args


def race(args: argparse.Namespace, bundle: DataBundle, device: torch.device, our_epochs: float | None,
         say: Callable[..., None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both arms, seeds alternating between them, after an untimed warm-up of each; `our_epochs` overrides the
    recipe's."""
    setup = SETUPS[args.data]
    peer_runs: list[dict[str, Any]] = []
    our_runs: list[dict[str, Any]] = []
    target = setup["target"] if args.peer_stops_at_target else None
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        # Warm-up: a few percent of an epoch of each arm, untimed, so that one-time costs fall outside the clock.
        train_peer(setup["peer"], bundle, 0, device, fraction=0.05, epochs=1)
        train_trainforge(setup["arm"], bundle, 0, device, Path(tmp) / "warmup", epochs=0.05)
        for seed in range(args.seeds):
            peer_runs.append(train_peer(setup["peer"], bundle, seed, device, epochs=args.peer_epochs, target=target))
            say(f"peer       seed {seed}: {peer_runs[-1]['test_acc']:.4f} in {peer_runs[-1]['train_seconds']:.2f} s "
                f"({len(peer_runs[-1]['epoch_accs'])} epochs)")
            our_runs.append(train_trainforge(setup["arm"], bundle, seed, device, Path(tmp) / f"ours-{seed}",
                                             our_epochs))
            say(f"trainforge seed {seed}: {our_runs[-1]['test_acc']:.4f} in {our_runs[-1]['train_seconds']:.2f} s")
    return peer_runs, our_runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup = SETUPS[args.data]
    device = resolve_device(args.device)
    bundle = load_data(args.data, args.data_dir)
    if args.quick:
        bundle = quick_bundle(bundle, 4096, 1000)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    load_before = os.getloadavg()[0]
    resolved = resolve(TrainConfig(**{**setup["arm"], "data": args.data}))
    # --quick: at most one epoch of trainforge's arm too.
    our_epochs = min(resolved.epochs, 1.0) if args.quick else resolved.epochs
    peer_runs, our_runs = race(args, bundle, device, our_epochs, say)
    peer, ours = summarize(peer_runs, setup["target"]), summarize(our_runs, setup["target"])
    peer_epochs = args.peer_epochs
    peer_steps = peer_epochs * -(-len(bundle.train.labels) // setup["peer"].batch_size)
    our_steps = math.ceil(our_epochs * -(-len(bundle.train.labels) // resolved.batch_size))
    peer_batch = (bundle.train.images[:setup["peer"].batch_size].float() / 255 - setup["peer"].mean) / setup["peer"].std
    peer["train_gflop"] = training_gflop(setup["peer"].build(), peer_batch, peer_steps)
    ours["train_gflop"] = training_gflop(
        build_classifier(resolved.model, len(bundle.classes), 1, 28, bundle.mean, bundle.std, width=resolved.width),
        bundle.train.images[:resolved.batch_size], our_steps)
    report = {
        "data": args.data, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seeds": args.seeds, "quick": args.quick, "train_images": len(bundle.train.labels), "target": setup["target"],
        "peer_name": setup["peer"].name, "peer_epochs": peer_epochs, "peer_stops_at_target": args.peer_stops_at_target,
        "recipe_name": resolved.recipe, "epochs": our_epochs, "peer": peer, resolved.recipe: ours,
        "recipe": {k: v for k, v in cfg_dict(resolved).items() if k in RECIPES[resolved.recipe]},
        "speedup": peer["seconds_median"] / ours["seconds_median"],
        "load_average": [load_before, os.getloadavg()[0]],
    }
    print_report(report, say)
    if not args.quick and args.seeds >= 3:
        record(report)
    if args.json:
        print(json.dumps(report))
    return report


def print_report(report: dict[str, Any], say: Callable[..., None]) -> None:
    name, target = report["recipe_name"], report["target"]
    say(f"\n{'arm':10s} {'test acc (mean ± std, min)':>30s} {'median s':>10s} {f's to {100 * target:g}%':>12s} "
        f"{'train GFLOP':>12s}")
    for arm in ("peer", name):
        s = report[arm]
        to_target = (f"{s['seconds_to_target_median']:.2f} ({s['reached']}/{len(s['accs'])})"
                     if s["reached"] else f"- (0/{len(s['accs'])})")
        say(f"{arm:10s} {100 * s['acc_mean']:>16.2f} ± {100 * s['acc_std']:.2f} %, {100 * s['acc_min']:.2f} "
            f"{s['seconds_median']:>10.2f} {to_target:>12s} {s['train_gflop']:>12.1f}")
    say(f"{name} is {report['speedup']:.2f}x faster than the peer ({report['peer_name']}, {report['peer_epochs']} "
        f"epochs; median training time, {report['seeds']} seeds, {report['device']}, {report['threads']} threads, "
        f"torch {report['torch']}; load average {report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f})")


def record(report: dict[str, Any]) -> None:
    """Writes trainforge's result into the package (trainforge/train/measured.json), for `trainforge models`."""
    ours = report[report["recipe_name"]]
    record_measurement(report["data"], report["recipe_name"], {
        "acc_mean": ours["acc_mean"], "acc_std": ours["acc_std"], "seeds": report["seeds"],
        "seconds_median": ours["seconds_median"], "device": report["device"], "threads": report["threads"],
        "torch": report["torch"], "date": datetime.date.today().isoformat(), "load_average": report["load_average"],
        "benchmark": f"benchmarks/time_to_accuracy.py --data {report['data']}"})


if __name__ == "__main__":
    main()
