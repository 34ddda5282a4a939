"""The statistics a report states about held-out predictions: intervals on per-class figures, calibration error, and
the temperature that calibrates a model's probabilities."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

# Below this many held-out images of a class, its figures are too uncertain to rank models by (issue 28): a recall
# of 0.9 on 30 images has the 95% interval 0.74-0.97.
UNCERTAIN_PER_CLASS = 30
# Calibration is measured in this many equal-width confidence bins, as Guo et al. (2017) did.
ECE_BINS = 15
# fit_temperature searches log T between these bounds: past them the probabilities are all but one-hot or uniform.
TEMPERATURE_RANGE = (0.01, 100.0)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (95% for z = 1.96); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def per_class_metrics(confusion: torch.Tensor, classes: Sequence[str], z: float = 1.96) -> list[dict[str, Any]]:
    """Precision and recall of each class, from a confusion matrix of counts [true, predicted], each with its Wilson
    interval and the images it counts (recall: the class's images; precision: the images predicted as the class).
    A figure of no images is None, its interval (0, 1)."""
    confusion = torch.as_tensor(confusion)
    correct, true, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    rows = []
    for i, name in enumerate(classes):
        row: dict[str, Any] = {"class": name}
        for figure, n in (("recall", int(true[i])), ("precision", int(predicted[i]))):
            hits = int(correct[i])
            row[figure] = hits / n if n else None
            row[f"{figure}_interval"] = wilson_interval(hits, n, z)
            row[f"{figure}_n"] = n
        rows.append(row)
    return rows


def uncertain_classes(confusion: torch.Tensor, classes: Sequence[str],
                      minimum: int = UNCERTAIN_PER_CLASS) -> list[str]:
    """The classes with fewer than `minimum` held-out images (rows of the confusion matrix [true, predicted])."""
    counts = torch.as_tensor(confusion).sum(1).tolist()
    return [name for name, count in zip(classes, counts) if count < minimum]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities [N, K]: the image-weighted mean, over equal-width bins of the top
    probability, of |accuracy - mean top probability| in the bin. NaN for no images."""
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels)
    if len(labels) == 0:
        return float("nan")
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(which, minlength=bins).double()
    gap = (torch.bincount(which, correct, minlength=bins) - torch.bincount(which, confidence, minlength=bins)).abs()
    return float(gap.sum() / count.sum())


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) for the true labels."""
    logits = torch.as_tensor(logits).double()
    return float(torch.nn.functional.cross_entropy(logits / temperature, torch.as_tensor(labels)))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tolerance: float = 1e-4) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on (validation) logits [N, K] and labels,
    within TEMPERATURE_RANGE: a golden-section search on log T, deterministic.

    The NLL is convex in 1 / T, so it has one minimum along log T, which the search brackets to `tolerance`."""
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one image")
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while high - low > tolerance:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = nll(logits, labels, math.exp(a))
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = nll(logits, labels, math.exp(b))
    return math.exp((low + high) / 2)
