"""The reference workload two ways, in one process: a plain PyTorch loop against trainforge's `reference` recipe.

The plain loop is the origin workload as people write it: a torchvision-style `Dataset` (a PIL image per sample,
`transforms.ToTensor()`, no normalization) behind a `DataLoader` (batch 64, shuffled), `Linear(784, 10)`, SGD lr 0.01,
10 epochs, a test-set evaluation after each epoch. trainforge runs `trainforge.train({"recipe": "reference"})`: the
same model and number of epochs (see trainforge/train/recipes.py for what it changes and why).

Both times cover the training loop including the per-epoch evaluations, not the one-time load of the data set.
trainforge's time is the median of `--repeats` runs (the first run is reported too), run between the plain loop's
epochs (outside its timing): on a shared host whose speed drifts over tens of seconds, both arms are then measured
over the same minute. (trainforge's `train()` tunes glibc's allocator for the process, `mallopt` in
trainforge/train/device.py; it changed the plain loop's time by under 3%, measured both ways.)

Usage:
  python benchmarks/reference.py              # the full workload (about 2 minutes on a 2-core CPU)
  python benchmarks/reference.py --json --repeats 20
  python benchmarks/reference.py --precision bf16   # on CPUs with native bf16 (AVX512-BF16, AMX)
  python benchmarks/reference.py --quick      # a small setting for tests: 1 epoch of 2,000 images each
"""

from __future__ import annotations

import argparse
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
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from trainforge.data import DataBundle, ImageSet, balanced_subset, load_data  # noqa: E402
from trainforge.train.recipes import record_measurement  # noqa: E402


class MNISTImages(Dataset):
    """What `torchvision.datasets.MNIST` does per item: a PIL image from the uint8 array, then the transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        self.images = images[:, 0]
        self.labels = labels
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy())  # a 2-D uint8 array is mode "L"
        return self.transform(image), int(self.labels[index])


def plain_loop(bundle: DataBundle, epochs: int, seed: int = 0,
               between_epochs: Callable[[int], None] | None = None) -> dict[str, float]:
    """The reference loop; its test accuracy after the last epoch and its time (the sum of its epochs' times).

    `between_epochs(epochs_done)` runs after each epoch, outside the timed part.
    """
    torch.manual_seed(seed)
    # Its own generator: whatever runs between the epochs cannot change this loop's shuffling.
    train_loader = DataLoader(MNISTImages(bundle.train.images, bundle.train.labels), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(MNISTImages(bundle.test.images, bundle.test.labels), batch_size=1000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    seconds, acc = 0.0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        acc = correct / len(test_loader.dataset)
        seconds += time.perf_counter() - start
        if between_epochs is not None:
            between_epochs(epoch + 1)
    return {"test_acc": acc, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of the trainforge run (the plain loop is CPU-only)")
    parser.add_argument("--data-dir", default=None, help="root of the built-in data sets (default: $TRAINFORGE_DATA)")
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16", "fp16"),
                        help="precision of the trainforge run (auto: fp32 on a CPU; bf16 pays on CPUs with native "
                             "bf16 such as AVX512-BF16 or AMX)")
    parser.add_argument("--quick", action="store_true", help="a small setting for tests: 1 epoch of 2,000 images")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--repeats", type=int, default=10,
                        help="trainforge runs to take the median of, spread between the plain loop's epochs (each "
                             "about a second; the plain loop runs once)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both arms (default: torch's own choice). On a CPU that other jobs "
                             "also use, fewer threads than cores avoid threads waiting on each other")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print

    bundle = load_data("mnist", args.data_dir)
    epochs = 10
    if args.quick:
        idx = balanced_subset(bundle.train.labels, 2000, 0)
        bundle = DataBundle(bundle.name, ImageSet(bundle.train.images[idx], bundle.train.labels[idx], bundle.classes),
                            ImageSet(bundle.test.images[:2000], bundle.test.labels[:2000], bundle.classes),
                            bundle.mean, bundle.std)
        epochs = 1

    results: list[Any] = []
    load_before = os.getloadavg()[0]

    def trainforge_runs(epochs_done: int) -> None:
        # Spread over the plain loop's epochs, so that both arms see the same moments of a shared, noisy host.
        while len(results) < math.ceil(args.repeats * epochs_done / epochs):
            with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
                result = trainforge.train({"recipe": "reference", "epochs": epochs, "device": args.device,
                                           "precision": args.precision, "out": str(Path(tmp) / "run"),
                                           "tensorboard": False}, data=bundle, progress=False)
            results.append(result)
            say(f"  trainforge run {len(results)}: {result.test_acc:.4f} in {result.train_seconds:.2f} s")

    say(f"plain PyTorch loop ({epochs} epoch(s), batch 64, DataLoader), with {args.repeats} trainforge "
        f"--recipe reference runs between its epochs ...")
    plain = plain_loop(bundle, epochs, between_epochs=trainforge_runs)
    say(f"  plain loop: {plain['test_acc']:.4f} in {plain['train_seconds']:.2f} s")
    # The runs share a seed, so they reach the same accuracy (on the CPU); the first one also pays the process's
    # one-time costs (thread pools, BLAS kernels, the allocator's first pages), which the median leaves out.
    result = results[-1]
    runs_seconds = [r.train_seconds for r in results]
    ours = {"test_acc": result.test_acc, "train_seconds": statistics.median(runs_seconds),
            "first_run_seconds": runs_seconds[0], "runs_seconds": runs_seconds}
    report = {"plain": plain, "trainforge": ours, "speedup": plain["train_seconds"] / ours["train_seconds"],
              "speedup_first_run": plain["train_seconds"] / runs_seconds[0],
              "epochs": epochs, "train_images": len(bundle.train.labels), "quick": args.quick,
              "device": result.device, "precision": result.precision, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    say(f"trainforge: {100 * ours['test_acc']:.2f}% vs {100 * plain['test_acc']:.2f}%, "
        f"{report['speedup']:.0f}x less training time ({plain['train_seconds']:.1f} s -> median "
        f"{ours['train_seconds']:.2f} s of {args.repeats} runs; first run {runs_seconds[0]:.2f} s, "
        f"{report['speedup_first_run']:.0f}x; {result.precision}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})")
    if not args.quick:
        record_measurement("mnist", "reference", {
            "acc_mean": ours["test_acc"], "acc_std": 0.0, "seeds": 1, "seconds_median": ours["train_seconds"],
            "device": report["device"], "threads": report["threads"], "torch": report["torch"],
            "date": datetime.date.today().isoformat(), "load_average": [load_before, os.getloadavg()[0]],
            "benchmark": f"benchmarks/reference.py ({args.repeats} runs of seed 0)"})
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
