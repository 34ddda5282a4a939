"""Fine-tuning speed: `trainforge finetune` against a plain PyTorch loop on the same model, in one run.

Each row fine-tunes one pretrained network on Fashion-MNIST (a seeded, class-balanced training subset, grayscale
upscaled to the row's resolution and expanded to 3 channels) for one epoch, then scores it on the row's test images.
Three arms, the same model, data, resolution, batch (64), optimizer (AdamW, lr 1e-3, weight decay 0.01, constant)
and epochs:
  trainforge   trainforge.finetune (strategy full, its own layout and precision choices, --precision as given)
  plain-nchw   a dozen lines of PyTorch: resize/normalize per batch, forward, backward, step; then evaluation under
               no_grad in batches of 256
  plain-cl     the same loop with the model and every batch in channels-last
Every run is a whole process, timed from outside (imports, data, weights, training and the final evaluation); each
arm runs --runs times, the arms interleaved so that a neighbour's load hits them alike, and the median is reported.
MFU is (training + evaluation FLOPs, counted by trainforge.hardware.flops) / wall-clock / the machine's measured
matmul ceiling for the arm's precision (`trainforge hw --measure`; empty where it was never measured).

Rows: EfficientNet-Lite0 at 64 px and at 224 px, and torchvision's ResNet-18 at 64 px, each with the numbers of
training and test images of ROWS below. ResNet-18's ImageNet weights are used
from the torch hub cache when present; otherwise both arms start from the same random initialisation (said so).
Fashion-MNIST is read from trainforge's data roots ($TRAINFORGE_DATA, ~/.cache/trainforge, ...).

  python benchmarks/finetune_speed.py [--runs 3] [--rows lite0-64 lite0-224 resnet18-64] [--device cpu]
                                      [--precision auto|32|bf16] [--compile] [--quick] [--json]

--precision and --compile apply to all arms on a GPU (the plain loop then autocasts and compiles as timm's script
does); on the CPU the plain loop stays fp32 unless --precision names bf16. --quick: tiny sizes on MNIST (which
ships with trainforge), one row and one run, to prove the script. Prints a Markdown table for benchmarks/RESULTS.md (with --json, one JSON object as
the last line).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
ARMS = ("trainforge", "plain-nchw", "plain-cl")
BATCH, LR, WEIGHT_DECAY, PLAIN_EVAL_BATCH = 64, 1e-3, 0.01, 256


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    arch: str  # registry name of the pretrained network
    image_size: int
    train_images: int
    test_images: int
    data: str = "fashion-mnist"


ROWS = {row.name: row for row in (
    # Sized so that the 27 processes of a default run finish in about half an hour on 2 shared cores; 224 px is
    # 12x the pixels of 64 px, ResNet-18 4x the FLOPs of EfficientNet-Lite0.
    Row("lite0-64", "efficientnet_lite0", 64, 1000, 2000),
    Row("lite0-224", "efficientnet_lite0", 224, 128, 256),
    Row("resnet18-64", "tv_resnet18", 64, 500, 1000),
)}


def quick(row: Row) -> Row:
    # On MNIST, which ships inside trainforge: --quick proves the script on a fresh clone too.
    return dataclasses.replace(row, image_size=32, train_images=64, test_images=64, data="mnist")


def load_bundle(row: Row):
    """The row's data set (Fashion-MNIST) with its seeded, class-balanced training subset and test images."""
    from trainforge.data import DataBundle, ImageSet, load_data
    from trainforge.data.loaders import balanced_subset

    bundle = load_data(row.data, subset=row.train_images, seed=0)
    test = bundle.test
    if row.test_images < len(test.labels):
        idx = balanced_subset(test.labels, row.test_images, seed=0)
        test = ImageSet(test.images[idx], test.labels[idx], test.classes)
    return DataBundle(bundle.name, bundle.train, test, bundle.mean, bundle.std)


def resnet18_source(work: Path) -> tuple[str, str]:
    """(--from, note): torchvision's ImageNet file when cached, else a seeded random initialisation saved once."""
    from trainforge.finetune.sources import torchvision_weights_file

    _, cached = torchvision_weights_file("resnet18")
    if cached.is_file():
        return "resnet18", "ImageNet weights"
    import torch
    from safetensors.torch import save_file
    from trainforge.models import create_model

    torch.manual_seed(0)
    path = work / "resnet18-random.safetensors"
    if not path.is_file():
        net = create_model("tv_resnet18", num_classes=1000, in_channels=3, image_size=224)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path), "random initialisation (no ImageNet weights offline), the same for every arm"


def source_for(row: Row, work: Path) -> tuple[str, str]:
    return resnet18_source(work) if row.arch == "tv_resnet18" else ("efficientnet_lite0", "ImageNet weights")


def worker(args: argparse.Namespace) -> dict:
    """One arm, one row, in this process: its test accuracy and choices."""
    import torch

    row = ROWS[args.row] if not args.quick else quick(ROWS[args.row])
    bundle = load_bundle(row)
    source = args.source
    if args.arm == "trainforge":
        from trainforge.finetune import finetune

        options = {"source": source, "strategy": "full", "backbone_lr_mult": 1.0}
        weights_file = {"model": "tv_resnet18"} if source.endswith(".safetensors") else {}
        result = finetune(options, {"data": row.data, "image_size": row.image_size, "epochs": 1,
                                    "batch_size": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
                                    "schedule": "constant", "warmup": 0.0, "label_smoothing": 0.0,
                                    "device": args.device, "precision": args.precision, "compile": args.compile,
                                    "out": args.out, "seed": 0, **weights_file}, data=bundle, progress=False)
        config = (Path(args.out) / "config.yaml").read_text()
        layout = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("layout:"))
        return {"test_acc": result["test_acc"], "precision": result["precision"], "layout": layout}
    torch.manual_seed(0)
    return plain_loop(row, bundle, source, args)


def plain_loop(row: Row, bundle, source: str, args: argparse.Namespace) -> dict:
    """The baseline: what a PyTorch user writes by hand."""
    import torch
    from torch import nn
    from trainforge.finetune.sources import head_name, load_source

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if args.arm == "plain-cl" else torch.contiguous_format
    src = load_source(source, bundle, model="tv_resnet18" if source.endswith(".safetensors") else None)
    net = src.net
    parent, _, attr = head_name(net).rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, attr, nn.Linear(getattr(owner, attr).in_features, len(bundle.classes)))
    model = net.to(device).to(memory_format=fmt)
    step_model = torch.compile(model) if args.compile else model
    mean = torch.tensor(src.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(src.std, device=device).view(1, -1, 1, 1)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device).float().div_(255)
        x = nn.functional.interpolate(x, size=(row.image_size, row.image_size), mode="bilinear", align_corners=False)
        return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=fmt)

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    images, labels = bundle.train.images, bundle.train.labels
    model.train()
    for idx in torch.randperm(len(labels)).split(BATCH):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(step_model(prep(images[idx])).float(), labels[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for x, y in zip(bundle.test.images.split(PLAIN_EVAL_BATCH), bundle.test.labels.split(PLAIN_EVAL_BATCH)):
            correct += int((step_model(prep(x)).argmax(1).cpu() == y).sum())
    return {"test_acc": correct / len(bundle.test.labels), "precision": args.precision if dtype else "32",
            "layout": "channels-last" if args.arm == "plain-cl" else "contiguous"}


def run_arm(arm: str, row: Row, source: str, args: argparse.Namespace, out: Path) -> dict:
    """One whole process of `arm`, timed from outside."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--row", row.name, "--source", source,
            "--device", args.device, "--precision", args.precision, "--out", str(out)]
    argv += ["--compile"] * args.compile + ["--quick"] * args.quick
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{arm} on {row.name} failed:\n{proc.stderr[-3000:]}")
    return {"wall_seconds": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def flops_per_image(row: Row) -> tuple[int, int]:
    """(training, inference) FLOPs per image of the row's network at its resolution."""
    import torch
    from trainforge.hardware.flops import count_flops
    from trainforge.models import create_model

    net = create_model(row.arch, num_classes=10, in_channels=3, image_size=row.image_size)
    count = count_flops(net, torch.empty(1, 3, row.image_size, row.image_size))
    return count.train, count.forward


def summarize(row: Row, note: str, runs: dict[str, list[dict]], device: str) -> list[dict]:
    import torch
    from trainforge.hardware.ceilings import lookup_ceiling

    train_flops, infer_flops = flops_per_image(row)
    work = row.train_images * train_flops + row.test_images * infer_flops
    samples = row.train_images + row.test_images
    base = statistics.median(r["wall_seconds"] for r in runs["plain-cl"])
    out = []
    for arm, records in runs.items():
        wall = statistics.median(r["wall_seconds"] for r in records)
        ceiling = lookup_ceiling(torch.device(device), records[0]["precision"])
        out.append({"row": row.name, "arch": row.arch, "image_size": row.image_size,
                    "train_images": row.train_images, "test_images": row.test_images, "weights": note, "arm": arm,
                    "precision": records[0]["precision"], "layout": records[0]["layout"],
                    "wall_seconds": wall, "walls": [r["wall_seconds"] for r in records],
                    "samples_per_second": samples / wall, "mfu": work / wall / ceiling if ceiling else None,
                    "test_acc": statistics.median(r["test_acc"] for r in records),
                    "accs": [r["test_acc"] for r in records], "speedup_vs_plain_cl": base / wall})
    return out


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
             f"{args.device}, --precision {args.precision}{' --compile' if args.compile else ''}, "
             f"median of {args.runs}", "",
             "| row | images (train/test) | arm | precision, layout | wall s (runs) | samples/s | MFU | test acc "
             "(runs) | vs plain-cl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        walls = ", ".join(f"{w:.1f}" for w in r["walls"])
        accs = ", ".join(f"{a:.4f}" for a in r["accs"])
        lines.append(f"| {r['row']} | {r['train_images']}/{r['test_images']} | {r['arm']} | {r['precision']}, "
                     f"{r['layout']} | {r['wall_seconds']:.1f} ({walls}) | {r['samples_per_second']:.1f} | {mfu} | "
                     f"{r['test_acc']:.4f} ({accs}) | {r['speedup_vs_plain_cl']:.2f}x |")
    notes = sorted({f"{r['arch']}: {r['weights']}" for r in results})
    return "\n".join(lines + ["", "Weights: " + "; ".join(notes) + "."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), help="default: all (with --quick: the first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one row, one run: proves the script")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(argparse.Namespace(**{**vars(args), "arm": args.worker}))))
        return
    runs = 1 if args.quick else args.runs
    args.runs = runs
    args.rows = args.rows or list(ROWS)[:1 if args.quick else None]
    results = []
    with tempfile.TemporaryDirectory(prefix="finetune-speed-") as tmp:
        work = Path(tmp)
        for name in args.rows:
            row = quick(ROWS[name]) if args.quick else ROWS[name]
            source, note = source_for(row, work)
            records: dict[str, list[dict]] = {arm: [] for arm in ARMS}
            for i in range(runs):
                # --quick proves the script, its times mean nothing: its arms run side by side.
                with concurrent.futures.ThreadPoolExecutor(max_workers=len(ARMS) if args.quick else 1) as pool:
                    done = [pool.submit(run_arm, arm, row, source, args, work / f"{name}-{arm}-{i}") for arm in ARMS]
                    for arm, future in zip(ARMS, done):
                        records[arm].append(future.result())
                        print(f"{name} {arm} run {i + 1}: {records[arm][-1]['wall_seconds']:.1f} s, "
                              f"acc {records[arm][-1]['test_acc']:.4f}", file=sys.stderr, flush=True)
            results += summarize(row, note, records, args.device)
    print(markdown(results, args))
    if args.json:
        print(json.dumps({"rows": results, "runs": runs, "device": args.device, "precision": args.precision,
                          "compile": args.compile}))


if __name__ == "__main__":
    main()
