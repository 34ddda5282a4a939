"""What a report shows about a run: its record, its model's predictions on its evaluation split, the figures,
and this machine's hardware."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch

from .. import config as cfg
from .. import runs
from ..errors import DataError
from . import stats

# Misclassified images shown per run, the most confidently wrong first.
WORST_IMAGES = 16


@dataclasses.dataclass
class HeldoutAnalysis:
    """A model's predictions on held-out images and what they say of it: accuracy, confusion, per-class precision and
    recall with 95% intervals, calibration, and the most confidently misclassified images."""

    classes: list[str]
    confusion: torch.Tensor          # int64 [true, predicted]
    accuracy: float
    per_class: list[dict[str, Any]]  # stats.per_class_metrics
    ece: float                       # expected calibration error of the model's probabilities
    uncertain: list[str]             # classes with fewer than stats.UNCERTAIN_PER_CLASS images
    worst_images: torch.Tensor       # uint8 [N, C, H, W]
    worst_true: list[str]
    worst_predicted: list[str]
    worst_confidence: list[float]

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        return self.confusion.diagonal().double() / self.confusion.sum(1).clamp_min(1)

    def summary(self) -> dict[str, Any]:
        """The figures as JSON-able values (the images left out)."""
        return {"images": int(self.confusion.sum()), "accuracy": self.accuracy, "ece": self.ece,
                "per_class": self.per_class, "uncertain_classes": self.uncertain, "classes": self.classes,
                "confusion": self.confusion.tolist(),
                "worst": [{"true": t, "predicted": p, "confidence": c}
                          for t, p, c in zip(self.worst_true, self.worst_predicted, self.worst_confidence)]}


@torch.inference_mode()
def model_logits(model: torch.nn.Module, images: torch.Tensor, *, device: torch.device = torch.device("cpu"),
                 batch_size: int = 2000) -> torch.Tensor:
    """The model's float32 logits [N, K] (divided by its temperature, if it has one) of uint8 images, on the CPU."""
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)] or [torch.empty(0, len(model.classes))])


def analyze_logits(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, classes: list[str],
                   worst: int = WORST_IMAGES) -> HeldoutAnalysis:
    """The HeldoutAnalysis of logits [N, K] of `images` whose true classes are `labels`."""
    probs = logits.double().softmax(1)
    predicted = probs.argmax(1)
    k = len(classes)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    wrong = torch.nonzero(predicted != labels).flatten()
    # Most confidently wrong first: the lowest probability given to the true class.
    order = wrong[probs[wrong, labels[wrong]].argsort()][:worst]
    return HeldoutAnalysis(
        classes=list(classes), confusion=confusion,
        accuracy=float((predicted == labels).double().mean()) if len(labels) else float("nan"),
        per_class=stats.per_class_metrics(confusion, classes), ece=stats.expected_calibration_error(probs, labels),
        uncertain=stats.uncertain_classes(confusion, classes), worst_images=images[order],
        worst_true=[classes[i] for i in labels[order].tolist()],
        worst_predicted=[classes[i] for i in predicted[order].tolist()],
        worst_confidence=probs[order, predicted[order]].tolist())


def heldout_analysis(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     classes: list[str] | None = None, *, device: torch.device = torch.device("cpu"),
                     batch_size: int = 2000, worst: int = WORST_IMAGES) -> HeldoutAnalysis:
    """Evaluates `model` (raw uint8 images [N, C, H, W] in, logits out) on held-out images and their labels;
    `classes` defaults to the model's own."""
    logits = model_logits(model, images, device=device, batch_size=batch_size)
    return analyze_logits(logits, labels, images, list(classes or model.classes), worst)


@dataclasses.dataclass
class RunAnalysis:
    """What the report shows about one run: its record and its model's predictions on its evaluation set."""

    label: str
    run_dir: str
    config: cfg.TrainConfig
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    split: str                       # "test", or "validation" for --holdout runs
    temperature: float               # what the run's model divides its logits by (1: not calibrated)
    heldout: HeldoutAnalysis


def analyze_run(run_dir: str | Path, label: str, *, data_dir: str | None = None,
                device: torch.device = torch.device("cpu"), batch_size: int = 2000,
                worst: int = WORST_IMAGES, evaluation: Any = None) -> RunAnalysis:
    """Reads a run's record and evaluates its model on the evaluation set it was trained against (or on
    `evaluation`, an ImageSet: the held-out part `auto` kept, files it skipped left out)."""
    run_dir = Path(run_dir)
    model = runs.load(run_dir, device)
    summary_path = run_dir / runs.SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{summary_path}: not valid JSON ({exc})") from None
    if evaluation is None:
        run_data = runs.load_run_data(run_dir, data_dir)
        config, evaluation = run_data.config, run_data.evaluation
    else:
        config = cfg.load_file(cfg.TrainConfig, run_dir / runs.CONFIG_FILE)
    if len(evaluation.classes) > len(model.classes):
        raise DataError(f"{config.data} has {len(evaluation.classes)} classes but the model of {run_dir} predicts "
                        f"{len(model.classes)}")
    return RunAnalysis(
        label=label, run_dir=str(run_dir), config=config, summary=summary, metrics=runs.read_metrics(run_dir),
        split="validation" if config.holdout else "test", temperature=model.info.temperature,
        heldout=heldout_analysis(model, evaluation.images, evaluation.labels, device=device, batch_size=batch_size,
                                 worst=worst))


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
    held = [(a.label, a.heldout) for a in analyses]
    if all(h.classes == held[0][1].classes for _, h in held):
        figures.append(("classes", "Per-class accuracy",
                        plots.per_class_accuracy([(label, h.per_class_accuracy) for label, h in held],
                                                 held[0][1].classes)))
    else:
        figures += [("classes", f"Per-class accuracy: {label}",
                     plots.per_class_accuracy([(label, h.per_class_accuracy)], h.classes)) for label, h in held]
    for a in analyses:
        figures += heldout_figures(a.heldout, a.label, a.split)
    return figures


def heldout_figures(heldout: HeldoutAnalysis, label: str, split: str) -> list[tuple[str, str, bytes]]:
    """(section, caption, PNG) of the confusion matrix and the most confidently misclassified images of the `split`
    set ("test", "validation", "held-out")."""
    from . import plots

    h = heldout
    return [("classes", f"Confusion matrix: {label} ({split} set)",
             plots.confusion_matrix(h.confusion, h.classes, f"{label}: {split} set")),
            ("worst", f"Most confidently misclassified {split} images: {label}",
             plots.worst_images(h.worst_images, h.worst_true, h.worst_predicted, h.worst_confidence,
                                f"{label}: predicted (confidence) / true"))]


def hardware_summary() -> dict[str, Any]:
    """This machine: torch, CPU and accelerators, with the measured ceilings of `trainforge hw --measure` if cached."""
    from ..hardware import ceilings, probe

    facts = probe.inspect()
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
    cached = ceilings.read_cache()
    if cached:
        for device, measured in cached["ceilings"].items():
            matmul = measured.get("matmul_flops") if isinstance(measured, dict) else None
            if isinstance(matmul, dict):
                rows[f"{device} matmul ceiling"] = ", ".join(f"{dtype} {value / 1e12:.2f} TFLOP/s"
                                                              for dtype, value in matmul.items()
                                                              if isinstance(value, (int, float)))
            bandwidth = measured.get("memory_bandwidth") if isinstance(measured, dict) else None
            if isinstance(bandwidth, (int, float)):
                rows[f"{device} memory bandwidth"] = f"{bandwidth / 1e9:.1f} GB/s"
        rows["ceilings measured at"] = cached.get("measured_at")
    return rows
