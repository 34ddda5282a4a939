"""Fine-tuning with few labels, and updating a model without forgetting, measured in one run.

Part 1: Fashion-MNIST with 1,000 labelled training images (class-balanced, seed 0), the same epoch budget for all:
  scratch      the cnn trained from random initialisation
  full-ft      full fine-tune of a cnn trained on MNIST (new head, backbone at --backbone-lr-mult of the head's lr),
               with finetune's defaults, and again with scratch's learning rate everywhere (full-ft-same-lr)
  lite0-probe  EfficientNet-Lite0 (ImageNet) linear probe, features cached once
  lite0-lora   EfficientNet-Lite0 LoRA (rank 8 on every dense conv) plus the head, merged after training
Each run monitors its progress on the first 1,000 test images; the final model (reloaded from its run directory) is
then scored on the full 10,000-image test set. The linear probe is the exception: its features are cached, so it
is monitored on the full test set directly (its reloaded model scores the same: tests/test_finetune.py checks it).
Training time is the loop's wall-clock, monitoring included, plus the probe's one pass of feature extraction.

Part 2: MNIST -> Fashion-MNIST update (`finetune --update`, 20 classes) from the same MNIST cnn, on the same 1,000
Fashion images, without mitigation, with replay, with distillation (LwF) and with both: MNIST and Fashion-MNIST test
accuracy (full test sets, after training; 1,000 of each monitored per epoch) under the joint 20-way head.

  python benchmarks/finetune.py [--epochs 3] [--image-size 64] [--mnist-subset 10000] [--source-run DIR] [--runs ..]

Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch

import trainforge
from trainforge.data import DataBundle, ImageSet, load_data
from trainforge.finetune import finetune
from trainforge.finetune.command import DEFAULTS
from trainforge.train.loop import evaluate


RUNS = ["scratch", "full-ft", "full-ft-same-lr", "lite0-probe", "lite0-lora", "update"]


def monitored(bundle: DataBundle, n: int) -> DataBundle:
    return DataBundle(bundle.name, bundle.train, ImageSet(bundle.test.images[:n], bundle.test.labels[:n],
                                                          bundle.test.classes), bundle.mean, bundle.std)


def accuracy(model: torch.nn.Module, test: ImageSet, offset: int = 0) -> float:
    return evaluate(model, test.images, test.labels + offset, 1000, torch.device("cpu"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--labels", type=int, default=1000, help="labelled Fashion-MNIST training images")
    parser.add_argument("--image-size", type=int, default=64, help="EfficientNet-Lite0 resolution (224 native)")
    parser.add_argument("--mnist-subset", type=int, default=10000, help="MNIST images the source cnn trains on")
    parser.add_argument("--monitor", type=int, default=1000, help="test images evaluated after each epoch")
    parser.add_argument("--runs", type=lambda text: text.split(","), default=RUNS,
                        help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--source-run", help="an existing MNIST cnn run to start from (default: train one)")
    parser.add_argument("--out", default="/tmp/finetune-bench")
    args = parser.parse_args()
    out = Path(args.out)
    common = {"epochs": args.epochs, "tensorboard": False, "seed": 0}

    fashion = load_data("fashion-mnist", subset=args.labels, seed=0)
    mnist = load_data("mnist")
    mnist_cnn, source_acc = Path(args.source_run or out / "mnist-cnn"), float("nan")
    if {"full-ft", "full-ft-same-lr", "update"} & set(args.runs):
        if not args.source_run:
            trainforge.train({"model": "cnn", "subset": args.mnist_subset, "out": str(mnist_cnn),
                              "tensorboard": False}, progress=False)
        source_acc = accuracy(trainforge.load(mnist_cnn), mnist.test)
        print(f"source: {mnist_cnn}, MNIST test acc {source_acc:.4f}", flush=True)

    rows = []

    def record(name: str, detail: str, result: dict, acc: float | None = None) -> None:
        acc = accuracy(trainforge.load(result["run_dir"]), fashion.test) if acc is None else acc
        seconds = result["train_seconds"] + result.get("feature_seconds", 0.0)
        rows.append((name, detail, acc, result["trainable_params"], result["total_params"], seconds))
        print(json.dumps({"run": name, "full_test_acc": acc, **{k: result[k] for k in (
            "trainable_params", "total_params", "train_seconds", "test_acc")}}), flush=True)

    mon = monitored(fashion, args.monitor)
    lite = {**common, "image_size": args.image_size}
    if "scratch" in args.runs:
        scratch = trainforge.train({**DEFAULTS, **common, "model": "cnn", "lr": 4e-3, "out": str(out / "scratch")},
                                   data=mon, progress=False)
        n_cnn = sum(p.numel() for p in trainforge.load(scratch.run_dir).parameters())
        record("scratch", "cnn, random init, AdamW lr 4e-3", {**scratch.to_dict(), "trainable_params": n_cnn,
                                                              "total_params": n_cnn})
    if "full-ft" in args.runs:
        record("full-ft", "cnn from MNIST, all layers, defaults: lr 2e-3, backbone lr x0.3",
               finetune({"source": str(mnist_cnn), "strategy": "full"}, {**common, "out": str(out / "full-ft")},
                        data=mon, progress=False))
    if "full-ft-same-lr" in args.runs:
        record("full-ft-same-lr", "cnn from MNIST, all layers, scratch's lr 4e-3 everywhere",
               finetune({"source": str(mnist_cnn), "strategy": "full", "backbone_lr_mult": 1.0},
                        {**common, "lr": 4e-3, "out": str(out / "full-ft-same-lr")}, data=mon, progress=False))
    if "lite0-probe" in args.runs:
        probe = finetune({"source": "efficientnet_lite0", "strategy": "linear-probe"},
                         {**lite, "out": str(out / "lite0-probe")}, data=fashion, progress=False)
        record("lite0-probe", f"EfficientNet-Lite0 ImageNet, {args.image_size} px, head only, cached features",
               probe, acc=probe["test_acc"])
    if "lite0-lora" in args.runs:
        record("lite0-lora", f"EfficientNet-Lite0 ImageNet, {args.image_size} px, LoRA r=8 + head, merged",
               finetune({"source": "efficientnet_lite0", "strategy": "lora"},
                        {**lite, "out": str(out / "lite0-lora")}, data=mon, progress=False))

    updates = []
    for name, replay, distill in (("none", 0, 0.0), ("replay 1000", 1000, 0.0), ("distill (LwF, w=1, T=2)", 0, 1.0),
                                  ("replay 1000 + distill", 1000, 1.0)):
        if "update" not in args.runs:
            break
        result = finetune({"source": str(mnist_cnn), "update": True, "replay": replay, "distill": distill},
                          {**common, "out": str(out / f"update-{replay}-{distill:g}")},
                          data=mon, old_data=monitored(mnist, args.monitor), progress=False)
        updated = trainforge.load(result["run_dir"])
        result.update(old_task_acc_before=source_acc, old_task_acc=accuracy(updated, mnist.test),
                      new_task_acc=accuracy(updated, fashion.test, offset=len(mnist.classes)))
        updates.append((name, result))
        print(json.dumps({"update": name, **{k: result[k] for k in (
            "old_task_acc_before", "old_task_acc", "new_task_acc", "train_seconds")}}), flush=True)

    print()
    print("## Fine-tuning (`benchmarks/finetune.py`)\n")
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, CPU, torch {torch.__version__}; "
          f"Fashion-MNIST, {args.labels} labelled training images (class-balanced, seed 0), {args.epochs:g} epochs "
          f"for every method, AdamW one-cycle, batch {DEFAULTS['batch_size']}; accuracy on the full 10,000-image "
          f"test set. " + (f"Source: a cnn trained on MNIST (`{mnist_cnn}`, test acc {source_acc:.4f}). "
                           if not math.isnan(source_acc) else "") +
          f"EfficientNet-Lite0 at {args.image_size} px instead of its native 224 (CPU budget).\n")
    print("| method | what trains | test acc | trainable params | total params | train time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, detail, acc, trainable, total, seconds in rows:
        print(f"| {name} | {detail} | {acc:.4f} | {trainable:,} ({100 * trainable / total:.1f}%) | {total:,} | "
              f"{seconds:.1f} |")
    if not updates:
        return
    print(f"\nMNIST -> Fashion-MNIST update, one 20-class head (MNIST classes first), full fine-tune of the MNIST cnn "
          f"on the same {args.labels} Fashion images, {args.epochs:g} epochs:\n")
    print("| mitigation | MNIST acc before | MNIST acc after | Fashion-MNIST acc | train time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in updates:
        print(f"| {name} | {r['old_task_acc_before']:.4f} | {r['old_task_acc']:.4f} | {r['new_task_acc']:.4f} | "
              f"{r['train_seconds']:.1f} |")


if __name__ == "__main__":
    main()
