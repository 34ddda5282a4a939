"""Compress a run's model (prune, distill, quantize) and measure what each step cost and bought.

Steps run in the order of the TAO flow: prune -> recovery fine-tune, distill, then quantize the result. Every
variant (the baseline first) is measured on each runtime offered: PyTorch eager, torch.compile and ONNX Runtime
(int8 variants run on ONNX Runtime only): test accuracy, parameters, file size, latency p50/p99 at batch 1 and
throughput at batch 256 (warm-up excluded, median of repeats). The report (report.json, report.md, report.png in
--out) marks the fastest runtime of each variant, and says so where int8 is slower than the best fp32 path.

  --prune R --prune-kind channel     remove a fraction R of the channels of every hidden layer (torch-pruning),
                                     then fine-tune; writes pruned-channel.onnx and .pt2 (a smaller network)
  --prune R --prune-kind magnitude   zero the fraction R of smallest weights (one global threshold), fine-tune
                                     with the mask held; reports the sparsity per layer
  --distill-from TEACHER_RUN         fine-tune the run's (smaller) model towards a teacher run's soft outputs;
                                     writes a loadable run directory distilled/
  --quantize int8                    ONNX Runtime int8: static QDQ (calibrated on training images) and dynamic
  --quantize fp16|bf16               the network in half precision (PyTorch), preprocessing kept in fp32

Examples:
  trainforge compress runs/x --quantize int8 --out runs/x-int8
  trainforge compress runs/x --prune 0.5 --quantize int8 --out runs/x-small --json
  trainforge compress runs/small --distill-from runs/big --out runs/small-kd --runtimes eager,onnxruntime
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import config as cfg
from .. import runs
from ..config import option
from ..deploy.formats import export_onnx, export_program, onnx_predictor, onnx_session, torch_predictor
from ..errors import ConfigError, DeployError
from ..models import count_params
from . import measure

PRUNE_KINDS = ("channel", "magnitude", "both")
QUANTIZE = ("int8", "fp16", "bf16")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run (the baseline)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the variants and the report")
    cfg.add_arguments(parser.add_argument_group("compression options"), Options, skip=("progress",))


@dataclasses.dataclass
class Variant:
    """One compressed (or baseline) model: a PyTorch module and/or an ONNX file, and what the step reported."""

    name: str
    module: nn.Module | None
    onnx: Path | None
    file: Path
    int8: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: int | None = None  # for ONNX-only variants, the parameter count of the model they quantize

    def __post_init__(self) -> None:
        if self.params is None and self.module is not None:
            self.params = count_params(self.module)


@dataclasses.dataclass
class Options:
    """What `compress_run` does; the CLI flags are generated from these fields."""

    prune: float | None = option(None, "fraction of channels/weights to prune (0-1, exclusive)", positive=True)
    prune_kind: str = option("channel", "structured channel pruning, unstructured magnitude pruning, or both",
                             choices=PRUNE_KINDS)
    quantize: str | None = option(None, "int8 (ONNX Runtime static and dynamic), fp16 or bf16", choices=QUANTIZE)
    distill_from: str | None = option(None, "run whose model teaches the run's model (TEACHER_RUN)")
    finetune_epochs: float = option(1.0, "epochs of recovery fine-tuning after pruning, and of distillation",
                                    positive=True)
    finetune_lr_scale: float = option(0.2, "fine-tuning learning rate as a fraction of the run's own", positive=True)
    subset: int | None = option(None, "fine-tune on a seeded, class-balanced subset of N training images",
                                positive=True)
    calibration_images: int = option(512, "training images that calibrate static int8 quantization", positive=True)
    test_images: int | None = option(None, "measure accuracy on the first N test images (default: all)",
                                     positive=True)
    runtimes: str = option(",".join(measure.RUNTIMES), "comma-separated runtimes to time")
    latency_calls: int = option(200, "batch-1 calls timed per runtime", positive=True)
    repeats: int = option(5, "timed throughput repeats per runtime", positive=True)
    data_dir: str | None = option(None, "root of the built-in data sets")
    device: str = option("auto", "device of the fine-tuning steps")
    progress: bool = True  # not a flag: the CLI sets it from --quiet/--json

    @property
    def runtime_list(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.runtimes.split(",") if r.strip())


def _validate(options: Options) -> None:
    cfg.validate(options, source="compress options")
    if options.prune is not None and not options.prune < 1.0:
        raise ConfigError(f"--prune must be a fraction between 0 and 1 (exclusive), got {options.prune}")
    unknown = [r for r in options.runtime_list if r not in measure.RUNTIMES]
    if unknown or not options.runtime_list:
        raise ConfigError(f"--runtimes: expected a comma-separated subset of {','.join(measure.RUNTIMES)}, "
                          f"got {options.runtimes or '(none)'}")
    if options.prune is None and options.quantize is None and options.distill_from is None:
        raise ConfigError("nothing to do: give --prune, --quantize and/or --distill-from")


@dataclasses.dataclass
class _Job:
    """One compression job: the run's model and data, and where the variants go."""

    options: Options
    out: Path
    model: nn.Module
    info: runs.ModelInfo
    saved: cfg.TrainConfig
    data: Any  # DataBundle: the training images fine-tuning uses, the test images measured
    calibration: np.ndarray  # training images that calibrate static int8 quantization
    example: torch.Tensor
    teacher: nn.Module | None

    def finetune(self, module: nn.Module, name: str, loss_fn: Any = None, keep: Path | None = None) -> dict[str, Any]:
        """Fine-tunes `module` in place with the run's recipe, scaled; `keep` keeps its run directory."""
        from ..train import Hooks, train

        saved, options = self.saved, self.options
        config = dataclasses.replace(saved, epochs=options.finetune_epochs, lr=saved.lr * options.finetune_lr_scale,
                                     subset=None, target_acc=None, compile=False, checkpoint_every=None,
                                     checkpoint_minutes=None, tensorboard=False, device=options.device)
        with tempfile.TemporaryDirectory() as tmp:
            # The fine-tuned variants are this command's own outputs, replaced when it runs again into --out.
            config = dataclasses.replace(config, out=str(keep or Path(tmp) / name), overwrite=True)
            result = train(config, data=self.data, hooks=Hooks(model=module, model_info=self.info, loss_fn=loss_fn),
                           progress=options.progress)
        module.cpu().eval()
        return {"finetune_epochs": options.finetune_epochs, "finetune_test_acc": result.test_acc}

    def with_onnx(self, name: str, module: nn.Module, **details: Any) -> Variant:
        path = self.out / f"{name}.onnx"
        export_onnx(module, path, self.example, info=self.info)
        return Variant(name, module, path, path, details=details)

    def save_program(self, module: nn.Module, name: str) -> None:
        export_program(module, self.out / name, self.example, self.info)


def compress_run(run_dir: str | Path, out: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Builds the asked variants of a run's model in `out`, measures them and writes the report there.

    Returns {"variants": [...]} (baseline first), each with name, test_acc, params, size_bytes, latency_ms_p50,
    latency_ms_p99 and throughput of its fastest runtime, plus the timings of every runtime.
    """
    options = options or Options()
    _validate(options)
    job = _prepare(Path(run_dir), Path(out), options)
    variants = [job.with_onnx("baseline", job.model)]
    current = variants[0]
    for step in (_prune_channels, _prune_magnitude, _distill):
        made = step(job, current)
        if made is not None:
            variants.append(made)
            current = made
    variants += _quantize(job, current, prefix="" if current is variants[0] else current.name + "+")
    test = job.data.test
    rows = [_measure(v, test, options) for v in variants]
    return _report(rows, job.out, teacher_acc=_teacher_acc(job.teacher, test) if job.teacher is not None else None)


def _prepare(run_dir: Path, out: Path, options: Options) -> _Job:
    from ..data import DataBundle, ImageSet, balanced_subset

    model = runs.load(run_dir)
    teacher = _load_teacher(options.distill_from, model) if options.distill_from else None
    out.mkdir(parents=True, exist_ok=True)
    run_data = runs.load_run_data(run_dir, options.data_dir)
    saved, full = run_data.config, run_data.dataset  # fine-tuning draws on every training image of the data set
    n_test = min(options.test_images or len(full.test.labels), len(full.test.labels))
    test = ImageSet(full.test.images[:n_test], full.test.labels[:n_test], full.classes)
    train_set = full.train
    if options.subset is not None:
        idx = balanced_subset(full.train.labels, options.subset, saved.seed)
        train_set = ImageSet(full.train.images[idx], full.train.labels[idx], full.classes)
    return _Job(options, out, model, model.info, saved, DataBundle(full.name, train_set, test, full.mean, full.std),
                full.train.images[:options.calibration_images].numpy(), full.test.images[:2], teacher)


def _prune_channels(job: _Job, current: Variant) -> Variant | None:
    """Channel pruning of the baseline, then a recovery fine-tune; also kept as a torch.export program."""
    if job.options.prune is None or job.options.prune_kind not in ("channel", "both"):
        return None
    from .prune import prune_channels

    pruned = prune_channels(job.model, job.options.prune, job.example)
    details = {"prune": "channel", "ratio": job.options.prune, "params_before": count_params(job.model)}
    details.update(job.finetune(pruned, "pruned-channel"))
    job.save_program(pruned, "pruned-channel.pt2")
    return job.with_onnx("pruned-channel", pruned, **details)


def _prune_magnitude(job: _Job, current: Variant) -> Variant | None:
    """Magnitude pruning of the current variant, fine-tuned with the mask held, then made permanent."""
    if job.options.prune is None or job.options.prune_kind not in ("magnitude", "both"):
        return None
    from .prune import apply_magnitude_masks, make_masks_permanent, sparsity_report

    sparse = copy.deepcopy(current.module)
    apply_magnitude_masks(sparse, job.options.prune)
    details = {"prune": "magnitude", "ratio": job.options.prune}
    details.update(job.finetune(sparse, "pruned-magnitude"))
    make_masks_permanent(sparse)
    details["sparsity"] = sparsity_report(sparse)
    return job.with_onnx("pruned-magnitude", sparse, **details)


def _distill(job: _Job, current: Variant) -> Variant | None:
    """The current variant fine-tuned towards the teacher's soft outputs."""
    if job.teacher is None:
        return None
    from .distill import distillation_loss

    student = copy.deepcopy(current.module)
    # The student keeps a loadable run directory while it still has the run's architecture; a channel-pruned
    # student is kept as a torch.export program instead.
    keep = job.out / "distilled" if current.name in ("baseline", "pruned-magnitude") else None
    details = {"teacher": str(job.options.distill_from), "teacher_params": count_params(job.teacher)}
    details.update(job.finetune(student, "distilled", distillation_loss(job.teacher), keep=keep))
    if keep is not None:
        details["run_dir"] = str(keep)
    else:
        job.save_program(student, "distilled.pt2")
    return job.with_onnx("distilled", student, **details)


def _quantize(job: _Job, current: Variant, prefix: str) -> list[Variant]:
    """int8 ONNX variants (static and dynamic) of the current variant, or its fp16/bf16 copy."""
    quantize = job.options.quantize
    if quantize == "int8":
        from .quantize import quantize_onnx_dynamic, quantize_onnx_static

        static = job.out / f"{prefix}int8-static.onnx"
        quantize_onnx_static(current.onnx, static, job.calibration)
        dynamic = job.out / f"{prefix}int8-dynamic.onnx"
        quantize_onnx_dynamic(current.onnx, dynamic)
        return [Variant(f"{prefix}int8-static", None, static, static, int8=True,
                        details={"quantize": "int8 static QDQ, per-channel weights",
                                 "calibration_images": len(job.calibration)}, params=current.params),
                Variant(f"{prefix}int8-dynamic", None, dynamic, dynamic, int8=True,
                        details={"quantize": "int8 dynamic"}, params=current.params)]
    if quantize in ("fp16", "bf16"):
        from .quantize import DTYPES, ReducedPrecision

        half = ReducedPrecision(current.module, DTYPES[quantize]).eval()
        job.save_program(half, f"{prefix}{quantize}.pt2")
        return [Variant(f"{prefix}{quantize}", half, None, job.out / f"{prefix}{quantize}.pt2",
                        details={"quantize": quantize})]
    return []


def _load_teacher(teacher_dir: str, student: nn.Module) -> nn.Module:
    teacher = runs.load(teacher_dir)
    if list(teacher.classes) != list(student.classes):
        raise DeployError(f"--distill-from {teacher_dir}: the teacher predicts classes {teacher.classes[:5]}..., "
                          f"the run's model {student.classes[:5]}...; they must be the same")
    return teacher


def _teacher_acc(teacher: nn.Module, test: Any) -> float:
    return measure.accuracy(torch_predictor(teacher), test.images.numpy(), test.labels.numpy())


def _predictors(variant: Variant, runtimes: tuple[str, ...]) -> dict[str, Any]:
    made: dict[str, Any] = {}
    for runtime in runtimes:
        if runtime == "onnxruntime" and variant.onnx is not None:
            made[runtime] = lambda: onnx_predictor(onnx_session(variant.onnx))
        elif runtime == "eager" and variant.module is not None:
            made[runtime] = lambda: torch_predictor(variant.module)
        elif runtime == "compile" and variant.module is not None:
            made[runtime] = lambda: measure.compiled_predictor(copy.deepcopy(variant.module))
    return made


def _measure(variant: Variant, test: Any, options: Options) -> dict[str, Any]:
    images, labels = test.images.numpy(), test.labels.numpy()
    sample = images[:256]
    timings, unavailable = [], {}
    test_acc = None
    for runtime, make in _predictors(variant, options.runtime_list).items():
        if options.progress:
            print(f"measuring {variant.name} on {runtime} ...", file=sys.stderr, flush=True)
        try:
            predict = make()
            if test_acc is None:
                test_acc = measure.accuracy(predict, images, labels)
            timings.append(measure.time_predictor(runtime, predict, sample, options.latency_calls, options.repeats))
        except Exception as exc:  # a runtime that cannot run this variant is reported, not fatal
            unavailable[runtime] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
    if not timings:
        raise DeployError(f"variant {variant.name}: no runtime among {', '.join(options.runtime_list)} could run it "
                          f"({json.dumps(unavailable)})")
    best = measure.fastest(timings)
    return {"name": variant.name, "test_acc": test_acc, "params": variant.params,
            "size_bytes": variant.file.stat().st_size,
            "latency_ms_p50": best.latency_ms_p50, "latency_ms_p99": best.latency_ms_p99,
            "throughput": best.throughput, "runtime": best.runtime, "int8": variant.int8,
            "file": str(variant.file), "runtimes": [dataclasses.asdict(t) for t in timings],
            "unavailable": unavailable, **variant.details}


def _int8_note(rows: list[dict[str, Any]], cpu: dict[str, Any]) -> str | None:
    int8 = [r for r in rows if r["int8"]]
    fp32 = [r for r in rows if not r["int8"]]
    if not int8:
        return None
    best8 = max(int8, key=lambda r: r["throughput"])
    best32 = max(fp32, key=lambda r: r["throughput"])
    ratio = best8["throughput"] / best32["throughput"]
    if ratio >= 1.0:
        return (f"int8 is faster here: {best8['name']} on {best8['runtime']} reaches {best8['throughput']:,.0f} img/s, "
                f"{ratio:.2f}x the best fp32 path ({best32['name']} on {best32['runtime']}, "
                f"{best32['throughput']:,.0f} img/s).")
    vnni = "has" if cpu["vnni"] else "lacks"
    return (f"int8 is slower than fp32 on this CPU: the fastest int8 variant ({best8['name']} on "
            f"{best8['runtime']}, {best8['throughput']:,.0f} img/s) reaches {ratio:.2f}x the best fp32 path "
            f"({best32['name']} on {best32['runtime']}, {best32['throughput']:,.0f} img/s). Why: this CPU {vnni} "
            f"VNNI int8 dot-product instructions{'' if cpu['vnni'] else ' (int8 products take extra widening steps)'}"
            f", and in a network this small the QuantizeLinear/DequantizeLinear conversions around every layer and "
            f"around the ops without int8 kernels (pooling, the global max, the output layer) cost about as much "
            f"as the convolutions save. int8 buys the file size here, not speed.")


def _report(rows: list[dict[str, Any]], out: Path, teacher_acc: float | None) -> dict[str, Any]:
    cpu = measure.cpu_features()
    notes = [n for n in (_int8_note(rows, cpu),) if n]
    if teacher_acc is not None:
        notes.append(f"teacher test accuracy: {teacher_acc:.4f}")
    for row in rows:
        for runtime, reason in row["unavailable"].items():
            notes.append(f"{row['name']}: {runtime} unavailable ({reason})")
    report = {"variants": rows, "notes": notes, "cpu": cpu, "torch": torch.__version__}
    runs.write_json(out / "report.json", report)
    runs.write_text(out / "report.md", _markdown(rows, notes, cpu))
    _plot(rows, out / "report.png")
    return report


def _markdown(rows: list[dict[str, Any]], notes: list[str], cpu: dict[str, Any]) -> str:
    features = ", ".join(k for k, v in cpu.items() if v) or "none detected"
    lines = ["# Compression report", "",
             f"CPU features: {features}; torch {torch.__version__}. "
             "Latency at batch 1 (p50/p99 of per-call times), throughput at batch 256 (median of repeats), warm-up "
             "excluded. ★ marks the fastest runtime of each variant.", "",
             "| variant | runtime | test acc | params | file bytes | p50 ms | p99 ms | img/s | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        for t in sorted(row["runtimes"], key=lambda t: -t["throughput"]):
            star = "★" if t["runtime"] == row["runtime"] else ""
            params = f"{row['params']:,}" if row["params"] is not None else "-"
            lines.append(f"| {row['name']} | {t['runtime']} | {row['test_acc']:.4f} | {params} | "
                         f"{row['size_bytes']:,} | {t['latency_ms_p50']:.3f} | {t['latency_ms_p99']:.3f} | "
                         f"{t['throughput']:,.0f} | {star} |")
    sparse = [r for r in rows if "sparsity" in r]
    for row in sparse:
        lines += ["", f"## Sparsity of {row['name']}", "", "| layer | weights | zeros | sparsity |",
                  "|---|---:|---:|---:|"]
        for name, layer in row["sparsity"]["layers"].items():
            lines.append(f"| {name} | {layer['weights']:,} | {layer['zeros']:,} | {layer['sparsity']:.1%} |")
        s = row["sparsity"]
        lines.append(f"| all | {s['weights']:,} | {s['zeros']:,} | {s['sparsity']:.1%} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = np.array([r["size_bytes"] for r in rows], dtype=float)
    ax.scatter([r["throughput"] for r in rows], [r["test_acc"] * 100 for r in rows],
               s=40 + 400 * sizes / sizes.max(), alpha=0.6)
    for row in rows:
        ax.annotate(f"{row['name']}\n({row['runtime']}, {row['size_bytes'] / 1024:.0f} KiB)",
                    (row["throughput"], row["test_acc"] * 100), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("throughput at batch 256, fastest runtime (images/s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs speed (marker area ~ file size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with runs.atomic_open(path) as handle:
        handle.write(buffer.getvalue())


def run(args: argparse.Namespace) -> dict[str, Any]:
    options = cfg.from_dict(Options, {**cfg.typed_options(args, Options), "progress": not (args.json or args.quiet)},
                            source="command line")
    report = compress_run(args.run_dir, args.out, options)
    if not (args.json or args.quiet):
        print((Path(args.out) / "report.md").read_text(), end="")
        print(f"\nwrote {args.out}/report.json, report.md, report.png", file=sys.stderr)
    keys = ("name", "test_acc", "params", "size_bytes", "latency_ms_p50", "latency_ms_p99", "throughput", "runtime")
    return {"variants": [{k: row[k] for k in keys} for row in report["variants"]]}
