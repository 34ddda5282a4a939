"""Write one self-contained HTML report of a run, or comparing several runs (plots embedded as PNG).

The report holds the loss and accuracy curves and the training throughput of each epoch (from metrics.jsonl), the
confusion matrix, the per-class accuracy and the most confidently misclassified images of the run's model on its
evaluation set (the test set, or the held-out validation part for runs trained with --holdout, such as tune
trials), and a summary of this machine's hardware. It needs no network and no other file to open.

Examples:
  trainforge report runs/x                        # writes runs/x/report.html
  trainforge report runs/a runs/b --out cmp.html  # one report comparing two runs
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import platform
from pathlib import Path
from typing import Any

import torch

from .. import config as cfg
from .. import runs
from ..errors import ConfigError, DataError

# Misclassified images shown per run, the most confidently wrong first.
WORST_IMAGES = 16


@dataclasses.dataclass
class RunAnalysis:
    """What the report shows about one run: its record and its model's predictions on its evaluation set."""

    label: str
    run_dir: str
    config: cfg.TrainConfig
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    split: str                       # "test", or "validation" for --holdout runs
    classes: list[str]
    confusion: torch.Tensor          # int64 [true, predicted]
    accuracy: float
    worst_images: torch.Tensor       # uint8 [N, C, H, W]
    worst_true: list[str]
    worst_predicted: list[str]
    worst_confidence: list[float]

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        return self.confusion.diagonal().double() / self.confusion.sum(1).clamp_min(1)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories of finished runs")
    parser.add_argument("--out", metavar="FILE.html",
                        help="report file (default: RUN_DIR/report.html for one run, report.html for several)")
    parser.add_argument("--data-dir", metavar="DIR", help="root of the built-in data sets (default: each run's own)")
    parser.add_argument("--device", default="auto", help="device that evaluates the models: auto, cpu, cuda, cuda:N "
                                                         "or mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=2000, metavar="N", help="evaluation batch size (default: 2000)")
    parser.add_argument("--worst", type=int, default=WORST_IMAGES, metavar="N",
                        help=f"misclassified images shown per run (default: {WORST_IMAGES})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = write_report(args.run_dirs, args.out, data_dir=args.data_dir, device=args.device,
                          batch_size=args.batch_size, worst=args.worst)
    if not (args.json or args.quiet):
        accuracies = ", ".join(f"{r['label']} {r['split']} accuracy {r['accuracy']:.4f}" for r in result["runs"])
        print(f"report with {result['images']} plots written to {result['out']} ({accuracies})")
    return result


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, *, data_dir: str | None = None,
                 device: str = "auto", batch_size: int = 2000, worst: int = WORST_IMAGES) -> dict[str, Any]:
    """Analyses each run, writes the HTML report (atomically) and returns where it is and what it shows."""
    from ..train.device import resolve_device

    if not run_dirs:
        raise ConfigError("report needs at least one RUN_DIR")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if worst < 0:
        raise ConfigError(f"--worst must be >= 0, got {worst}")
    for run_dir in run_dirs:
        runs.read_model_info(run_dir)  # a missing or unfinished run is named before anything else
    out_path = Path(out) if out else (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1
                                      else Path("report.html"))
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out_path}: expected a file name ending in .html")
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out {out_path}: directory {out_path.parent} does not exist")
    dev = resolve_device(device)
    labels = _labels([Path(d) for d in run_dirs])
    analyses = [analyze_run(d, label, data_dir=data_dir, device=dev, batch_size=batch_size, worst=worst)
                for d, label in zip(run_dirs, labels)]
    figures = build_figures(analyses)
    page = render_html(analyses, figures, hardware_summary())
    runs.write_text(out_path, page)
    return {"out": str(out_path), "images": len(figures),
            "runs": [{"label": a.label, "run_dir": a.run_dir, "split": a.split, "accuracy": a.accuracy,
                      "per_class_accuracy": dict(zip(a.classes, a.per_class_accuracy.tolist()))}
                     for a in analyses]}


def _labels(paths: list[Path]) -> list[str]:
    """Short names for the runs: their directory names, or their paths where names repeat."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


@torch.inference_mode()
def analyze_run(run_dir: str | Path, label: str, *, data_dir: str | None = None,
                device: torch.device = torch.device("cpu"), batch_size: int = 2000,
                worst: int = WORST_IMAGES) -> RunAnalysis:
    """Reads a run's record and evaluates its model on the evaluation set it was trained against."""
    from ..data import load_data
    from ..data.loaders import holdout_split

    run_dir = Path(run_dir)
    model = runs.load(run_dir, device)
    config = cfg.load_file(cfg.TrainConfig, run_dir / runs.CONFIG_FILE)
    summary_path = run_dir / runs.SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{summary_path}: not valid JSON ({exc})") from None
    bundle = load_data(config.data, data_dir or config.data_dir, subset=config.subset, seed=config.seed,
                       image_size=config.image_size, val_fraction=config.val_fraction, loader=config.loader)
    if config.holdout:
        bundle = holdout_split(bundle, config.val_fraction, config.seed)
    classes = list(model.classes)
    if len(bundle.classes) > len(classes):
        raise DataError(f"{bundle.name} has {len(bundle.classes)} classes but the model of {run_dir} predicts "
                        f"{len(classes)}")
    images, labels = bundle.test.images, bundle.test.labels
    probs = torch.cat([model(images[i:i + batch_size].to(device)).float().softmax(1).cpu()
                       for i in range(0, len(labels), batch_size)])
    predicted = probs.argmax(1)
    k = len(classes)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    wrong = torch.nonzero(predicted != labels).flatten()
    # Most confidently wrong first: the lowest probability given to the true class.
    order = wrong[probs[wrong, labels[wrong]].argsort()][:worst]
    return RunAnalysis(
        label=label, run_dir=str(run_dir), config=config, summary=summary, metrics=runs.read_metrics(run_dir),
        split="validation" if config.holdout else "test", classes=classes, confusion=confusion,
        accuracy=float((predicted == labels).double().mean()) if len(labels) else float("nan"),
        worst_images=images[order], worst_true=[classes[i] for i in labels[order].tolist()],
        worst_predicted=[classes[i] for i in predicted[order].tolist()],
        worst_confidence=probs[order, predicted[order]].tolist())


def build_figures(analyses: list[RunAnalysis]) -> list[tuple[str, str, bytes]]:
    """(section, caption, PNG) of every plot: the shared curves first, then each run's own plots."""
    from . import plots

    curves = [(a.label, a.metrics, a.split) for a in analyses]
    figures = [("curves", "Loss per epoch", plots.loss_curves(curves)),
               ("curves", "Accuracy per epoch", plots.accuracy_curves(curves)),
               ("curves", "Training throughput", plots.throughput(curves))]
    episodic = [(a.label, a.summary["episodes"]) for a in analyses if a.summary.get("episodes")]
    if episodic:  # few-shot runs measured with --episodes
        figures.append(("fewshot", "Few-shot accuracy against shots per class", plots.fewshot_accuracy(episodic)))
    if all(a.classes == analyses[0].classes for a in analyses):
        figures.append(("classes", "Per-class accuracy",
                        plots.per_class_accuracy([(a.label, a.per_class_accuracy) for a in analyses],
                                                 analyses[0].classes)))
    else:
        figures += [("classes", f"Per-class accuracy: {a.label}",
                     plots.per_class_accuracy([(a.label, a.per_class_accuracy)], a.classes)) for a in analyses]
    for a in analyses:
        figures.append(("classes", f"Confusion matrix: {a.label} ({a.split} set)",
                        plots.confusion_matrix(a.confusion, a.classes, f"{a.label}: {a.split} set")))
        figures.append(("worst", f"Most confidently misclassified {a.split} images: {a.label}",
                        plots.worst_images(a.worst_images, a.worst_true, a.worst_predicted, a.worst_confidence,
                                           f"{a.label}: predicted (confidence) / true")))
    return figures


def hardware_summary() -> dict[str, Any]:
    """This machine: torch, CPU and accelerators, with the measured ceilings of `trainforge hw --measure` if cached."""
    from ..bench import cache, hw

    facts = hw.inspect()
    cpu = facts["cpu"]
    rows = {"host": facts["host"], "python": facts["python"], "torch": facts["torch"],
            "platform": platform.platform(), "CPU": cpu["model"],
            "CPU cores (physical / logical / usable)": f"{cpu['physical_cores']} / {cpu['logical_cpus']} / "
                                                       f"{cpu['usable_cpus']}",
            "CPU ISA": cpu["isa"], "torch threads": cpu["torch_threads"]}
    if facts["cuda"]:
        for gpu in facts["cuda"]["devices"]:
            rows[f"cuda:{gpu['index']}"] = (f"{gpu['name']}, {gpu['memory_gib']:.0f} GiB, compute capability "
                                            f"{gpu['compute_capability']}, {gpu['sm_count']} SMs")
        rows["CUDA / cuDNN / driver"] = (f"{facts['cuda']['runtime']} / {facts['cuda']['cudnn']} / "
                                         f"{facts['cuda']['driver']}")
    else:
        rows["GPU"] = "none"
    if facts["mps"]:
        rows["MPS"] = "available"
    cached = cache.read_cache()
    if cached:
        for device, ceilings in cached["ceilings"].items():
            matmul = ceilings.get("matmul_flops") if isinstance(ceilings, dict) else None
            if isinstance(matmul, dict):
                rows[f"{device} matmul ceiling"] = ", ".join(f"{dtype} {value / 1e12:.2f} TFLOP/s"
                                                              for dtype, value in matmul.items()
                                                              if isinstance(value, (int, float)))
            bandwidth = ceilings.get("memory_bandwidth") if isinstance(ceilings, dict) else None
            if isinstance(bandwidth, (int, float)):
                rows[f"{device} memory bandwidth"] = f"{bandwidth / 1e9:.1f} GB/s"
        rows["ceilings measured at"] = cached.get("measured_at")
    return rows


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; }
"""

RUN_FIELDS = (("model", "model"), ("data", "data"), ("subset", "subset"), ("epochs", "epochs"),
              ("batch size", "batch_size"), ("optimizer", "optimizer"), ("lr", "lr"),
              ("weight decay", "weight_decay"), ("schedule", "schedule"), ("augment", "augment"),
              ("width", "width"), ("seed", "seed"))


def render_html(analyses: list[RunAnalysis], figures: list[tuple[str, str, bytes]],
                hardware: dict[str, Any]) -> str:
    """The whole report as one HTML document; images are inline data: URIs."""
    esc = html.escape
    title = "trainforge report: " + ", ".join(a.label for a in analyses)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", "<h2>Runs</h2>"]
    header = ["", *[esc(a.label) for a in analyses]]
    body = [["run directory", *[esc(a.run_dir) for a in analyses]],
            ["evaluated on", *[f"{a.split} set, {int(a.confusion.sum())} images" for a in analyses]],
            ["accuracy (now)", *[f"{100 * a.accuracy:.2f}%" for a in analyses]],
            ["accuracy (at the end of training)",
             *[_pct(a.summary.get("test_acc")) for a in analyses]],
            ["training time", *[_seconds(a.summary.get("train_seconds")) for a in analyses]],
            ["samples / s", *[_number(a.summary.get("samples_per_second")) for a in analyses]],
            ["device, precision", *[esc(f"{a.summary.get('device', '?')}, {a.summary.get('precision', '?')}")
                                    for a in analyses]]]
    for name, field in RUN_FIELDS:
        body.append([name, *[esc(_value(getattr(a.config, field))) for a in analyses]])
    parts.append(_table(header, body))
    sections = {"curves": "Training curves", "fewshot": "Few-shot episodes", "classes": "Classes",
                "worst": "Worst-classified images"}
    for key, heading in sections.items():
        chosen = [(caption, png) for section, caption, png in figures if section == key]
        if chosen:
            parts.append(f"<h2>{heading}</h2>")
        for caption, png in chosen:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{esc(caption)}\">"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("<h2>Hardware (the machine that made this report)</h2>")
    parts.append(_table(["", "value"], [[esc(k), esc(str(v))] for k, v in hardware.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + f"<th>{row[0]}</th>" + "".join(f"<td>{c}</td>" for c in row[1:]) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "?"


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "?"


def _number(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else "?"
