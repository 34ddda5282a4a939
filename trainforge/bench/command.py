"""Measure how fast a model trains and infers on each device, precision and batch size, and how close to the
machine's ceiling that is.

For every combination of --device, --precision and --batch-size: training throughput (samples/s) and step latency
(one optimizer step of the model's recipe, on real batches kept on the device), inference throughput and batch
latency, the FLOPs per sample (counted by torch.utils.flop_counter: matmuls and convolutions, forward, and forward +
backward for training), the achieved FLOP/s and its fraction of the measured matmul ceiling (MFU), and the speed-up
of every other device over the CPU at the same batch size (none on the CPU's own rows). The ceilings come from `trainforge hw --measure`'s cache; a
device never measured is measured first (a few seconds) and added to it.

Latencies are medians (and 90th percentiles) of per-step times: CUDA events on a GPU, so no step waits for another.

Examples:
  trainforge bench --model cnn                                  # every device present, its default precision
  trainforge bench --model linear --batch-size 128 512 2048 --plot bench.png
  trainforge bench --model resnet18 --device cpu cuda --precision 32 bf16 --json
  trainforge bench --model resnet18 --image-size 224 --device cuda --precision bf16   # ImageNet-sized inputs
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import config as cfg
from ..errors import ConfigError
from ..hardware import ceilings, probe
from ..hardware.flops import count_flops
from ..train.device import synchronize
from ..train.progress import Bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="linear", help="registered model name (default: linear)")
    parser.add_argument("--data", default="mnist", help="built-in data set or image folder (default: mnist)")
    parser.add_argument("--data-dir", help="root of the built-in data sets")
    parser.add_argument("--width", type=int, help="width of models that take one")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="side length the model works at: images are resized inside the model, as "
                             "`finetune --image-size` does (default: the data's own size)")
    parser.add_argument("--device", nargs="+", default=["all"], metavar="DEVICE",
                        help="devices to compare: all (every device present; the default), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=("auto", "32", "bf16", "fp16"),
                        help="precisions to compare (default: auto, each device's training default)")
    parser.add_argument("--batch-size", nargs="+", type=int, metavar="N",
                        help="batch sizes to compare (default: the model's recipe batch size)")
    parser.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default: 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before each measurement; compilation happens here (default: 3)")
    parser.add_argument("--plot", metavar="FILE", help="also draw throughput and MFU into this PNG file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    show = not (args.json or args.quiet)
    if args.plot:
        _check_plot_path(Path(args.plot))  # before minutes of measuring, not after
    result = bench(args.model, args.data, data_dir=args.data_dir, width=args.width, image_size=args.image_size,
                   devices=args.device, precisions=args.precision, batch_sizes=args.batch_size, compile=args.compile,
                   steps=args.steps, warmup=args.warmup, progress=show)
    if args.plot:
        result["plot"] = str(plot(result, args.plot))
    if show:
        print_table(result)
    return result


def bench(model: str, data: str = "mnist", *, data_dir: str | None = None, width: int | None = None,
          image_size: int | None = None, devices: list[str] | None = None, precisions: list[str] | None = None,
          batch_sizes: list[int] | None = None, compile: bool = False, steps: int = 20, warmup: int = 3,
          progress: bool = False) -> dict[str, Any]:
    """Throughput, latency, FLOPs and MFU of `model` for every (device, precision, batch size) asked for.

    Returns {"model", "data", "flops_per_sample": {"forward", "train"}, "results": [one dict per combination],
    "skipped": [combinations that cannot run here, with the reason], ...}. Combinations are skipped, not fatal,
    when a precision does not exist on a device (fp16 on the CPU); if none can run, that is an error.
    """
    from ..data import load_data
    from ..models import build_classifier
    from ..train import recipes

    _check_counts(steps, warmup, width, image_size, batch_sizes or [])
    config = recipes.resolve(cfg.TrainConfig(model=model, data=data, width=width))
    batch_sizes = list(dict.fromkeys(batch_sizes or [config.batch_size]))
    combos, skipped = _combinations(devices, precisions, batch_sizes)
    bundle = load_data(data, data_dir, seed=0)
    if max(batch_sizes) > len(bundle.train.labels):
        raise ConfigError(f"--batch-size {max(batch_sizes)} is larger than the {len(bundle.train.labels)} "
                          f"training images of {bundle.name}")
    side = image_size or bundle.image_size
    net = build_classifier(model, len(bundle.classes), bundle.in_channels, side, bundle.mean, bundle.std, width=width)
    flops = count_flops(net, bundle.train.images[:1])
    record = _ceilings({d for d, _, _ in combos}, progress)
    rows = []
    bar = Bar(progress, "bench", len(combos), fields=("what",))
    try:
        for device, precision, batch_size in combos:
            bar.update(what=f"{ceilings.device_key(device)} {precision} batch {batch_size}")
            torch.manual_seed(0)
            net = build_classifier(model, len(bundle.classes), bundle.in_channels, side, bundle.mean, bundle.std,
                                   width=width)
            row = measure(net, config, bundle.train.images, bundle.train.labels, device, precision, batch_size,
                          compile=compile, steps=steps, warmup=warmup)
            ceiling = ceilings.lookup_ceiling(device, precision, record)
            row.update(ceiling_dtype=ceilings.matmul_dtype(device, precision), ceiling_flops_per_second=ceiling,
                       train_flops_per_second=flops.train * row["train_samples_per_second"],
                       inference_flops_per_second=flops.forward * row["inference_samples_per_second"])
            row["train_mfu"] = row["train_flops_per_second"] / ceiling if ceiling else None
            row["inference_mfu"] = row["inference_flops_per_second"] / ceiling if ceiling else None
            rows.append(row)
            bar.advance()
    finally:
        bar.close()
    _add_speedups(rows)
    return {"model": model, "data": bundle.name, "image_shape": list(bundle.train.images.shape[1:]), "image_size": side,
            "recipe": config.recipe, "optimizer": config.optimizer, "compile": compile, "steps": steps,
            "warmup": warmup, "flops_per_sample": {"forward": flops.forward, "train": flops.train},
            "results": rows, "skipped": skipped, "ceilings_file": str(ceilings.cache_path()), "plot": None}


def _check_counts(steps: int, warmup: int, width: int | None, image_size: int | None, batch_sizes: list[int]) -> None:
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if width is not None and width < 1:
        raise ConfigError(f"--width must be >= 1, got {width}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be >= 1, got {image_size}")
    for b in batch_sizes:
        if b < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {b}")


def _combinations(devices: list[str] | None, precisions: list[str] | None, batch_sizes: list[int]
                  ) -> tuple[list[tuple[torch.device, str, int]], list[dict[str, str]]]:
    """The (device, precision, batch size) combinations that can run here, and those skipped with the reason."""
    from ..train.device import resolve_device, resolve_precision

    device_list = list(dict.fromkeys(
        d for name in (devices or ["all"])
        for d in (probe.devices_present() if name == "all" else [resolve_device(name)])))
    combos, skipped = [], []
    for device, name in itertools.product(device_list, dict.fromkeys(precisions or ["auto"])):
        try:
            combos += [(device, resolve_precision(name, device), b) for b in batch_sizes]
        except ConfigError as exc:
            skipped.append({"device": str(device), "precision": name, "reason": str(exc)})
    combos = list(dict.fromkeys(combos))
    if not combos:
        raise ConfigError("no combination of --device and --precision can run here: "
                          + "; ".join(s["reason"] for s in skipped))
    return combos, skipped


def measure(net: torch.nn.Module, config: cfg.TrainConfig, images: torch.Tensor, labels: torch.Tensor,
            device: torch.device, precision: str, batch_size: int, *, compile: bool = False, steps: int = 20,
            warmup: int = 3) -> dict[str, Any]:
    """Training-step and inference timings of `net` (a Classifier taking uint8 images) on real batches.

    The training step is `train()`'s own (`train.loop.step`) with the recipe's optimizer; batches are drawn on the
    device the way training draws them.
    """
    from ..data import DeviceLoader
    from ..train.device import autocast, configure_backends
    from ..train.loop import StepParts, cross_entropy_loss, make_optimizer, step

    configure_backends(device)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    step_model = torch.compile(net) if compile else net
    # The trainer's own step and loss; no schedule, as the learning rate does not change a step's cost.
    parts = StepParts(model=net, step_model=step_model,
                      optimizer=make_optimizer(config, [{"params": list(net.parameters())}], device), scheduler=None,
                      scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
                      criterion=cross_entropy_loss(config.label_smoothing), device=device,
                      precision=precision)
    loader = DeviceLoader(images, labels, batch_size, device=device, shuffle=True, seed=0, drop_last=True)
    batches = _cycle(loader)

    def train_step() -> None:
        step(parts, *next(batches))

    @torch.inference_mode()
    def infer_step() -> None:
        x, _ = next(batches)
        with autocast(device, precision):
            step_model(x)

    net.train()
    train = _figures("train", "train_step_ms", batch_size, _time_steps(train_step, device, steps, warmup))
    net.eval()
    infer = _figures("inference", "inference_batch_ms", batch_size, _time_steps(infer_step, device, steps, warmup))
    return {"device": ceilings.device_key(device), "precision": precision, "batch_size": batch_size,
            "compile": compile, **train, **infer,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def _figures(mode: str, latency: str, batch_size: int, times: list[float]) -> dict[str, float]:
    """`<mode>_samples_per_second` over all timed steps (stalls included), and the `<latency>` median and 90th
    percentile (`<latency>_p90`) of the steps, in ms."""
    ms = 1e3 * np.array(times)
    return {f"{mode}_samples_per_second": batch_size * len(times) / sum(times),
            latency: float(np.median(ms)), f"{latency}_p90": float(np.percentile(ms, 90))}


def _cycle(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _time_steps(step: Any, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones; on CUDA read from events after one final sync."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        # Events record on the current device's stream, so that device must be the one measured.
        with torch.cuda.device(device):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
            for i in range(steps):
                step()
                events[i + 1].record()
            torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _ceilings(devices: set[torch.device], progress: bool) -> dict[str, Any]:
    """The cached ceilings, after measuring (and caching) any device among `devices` that has none yet."""
    record = ceilings.read_cache() or {"measured_at": probe.timestamp(), "machine": probe.inspect(), "ceilings": {}}
    missing = [d for d in devices if ceilings.device_key(d) not in record["ceilings"]]
    for device in missing:
        if progress:
            print(f"measuring the ceilings of {ceilings.device_key(device)} (first use; `trainforge hw --measure` "
                  f"re-measures them all)", file=sys.stderr)
        record["ceilings"][ceilings.device_key(device)] = probe.measure_device(device)
    if missing:
        ceilings.write_cache(record)
    return record


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each other device over the CPU at the same batch size (and precision, else the CPU's fp32), when
    the CPU was measured; None where there is nothing to compare (the CPU's own rows are the baseline, not 1.0x)."""
    cpu = {(r["precision"], r["batch_size"], r["compile"]): r for r in rows if r["device"] == "cpu"}
    for row in rows:
        base = cpu.get((row["precision"], row["batch_size"], row["compile"])) or \
            cpu.get(("32", row["batch_size"], row["compile"]))
        for mode in ("train", "inference"):
            key = f"{mode}_samples_per_second"
            row[f"{mode}_speedup_vs_cpu"] = row[key] / base[key] if base and row["device"] != "cpu" else None


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    flops = result["flops_per_sample"]
    resized = f" at {result['image_size']}px" if result["image_size"] != result["image_shape"][-1] else ""
    table = Table(title=f"{result['model']} on {result['data']}{resized}: {flops['forward']:,} FLOPs/sample forward, "
                        f"{flops['train']:,} per training sample; ms: median per step (train) or batch "
                        f"(infer); MFU: of the measured matmul ceiling")
    # One row per mode keeps the table within 80 columns; the JSON has every figure, p90 latencies included.
    for column in ("device", "prec", "batch", "mode", "samples/s", "ms", "GFLOP/s", "MFU", "x CPU"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in result["results"]:
        for mode, latency in (("train", "train_step_ms"), ("infer", "inference_batch_ms")):
            key = "train" if mode == "train" else "inference"
            table.add_row(r["device"], r["precision"], str(r["batch_size"]), mode,
                          f"{r[f'{key}_samples_per_second']:,.0f}", f"{r[latency]:.1f}",
                          f"{r[f'{key}_flops_per_second'] / 1e9:,.2f}", _pct(r[f"{key}_mfu"]),
                          _x(r[f"{key}_speedup_vs_cpu"]), end_section=mode == "infer")
    console = Console()
    console.print(table)
    for s in result["skipped"]:
        console.print(f"skipped {s['device']} {s['precision']}: {s['reason']}")
    if result["plot"]:
        console.print(f"plot written to {result['plot']}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Draws samples/s and MFU of every combination (training and inference side by side) into a PNG file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs import atomic_open

    path = Path(path)
    _check_plot_path(path)
    rows = result["results"]
    labels = [f"{r['device']}\n{r['precision']}, b{r['batch_size']}" for r in rows]
    x = range(len(rows))
    fig, (ax_rate, ax_mfu) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.5))
    for offset, mode in ((-0.2, "train"), (0.2, "inference")):
        ax_rate.bar([i + offset for i in x], [r[f"{mode}_samples_per_second"] for r in rows], width=0.4, label=mode)
        ax_mfu.bar([i + offset for i in x], [100 * (r[f"{mode}_mfu"] or 0.0) for r in rows], width=0.4, label=mode)
    ax_rate.set(ylabel="samples/s", yscale="log", title="throughput")
    ax_mfu.set(ylabel="% of measured matmul ceiling", title="MFU")
    for ax in (ax_rate, ax_mfu):
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['data']}")
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def _check_plot_path(path: Path) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"--plot {path}: is a directory; give a file name such as {path / 'bench.png'}")


