"""The report's figures, each returned as PNG bytes (matplotlib's Agg renderer: no display, no global pyplot state)."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import torch

# Runs compared in one figure take their colours from this cycle (matplotlib's default "tab10").
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")
# Above this many classes the confusion matrix cells are too small to print their counts in.
ANNOTATE_MAX_CLASSES = 20


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _series(metrics: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    pairs = [(m[x_key], m[y_key]) for m in metrics if m.get(x_key) is not None and m.get(y_key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def _finish_curves(ax: Any, drawn: bool, what: str, **labels: str) -> None:
    """A legend, or a "no data" note when no run had a point; then axis labels, title and grid."""
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, what)
    ax.set(**labels)
    ax.grid(alpha=0.3)


def loss_curves(runs: Sequence[tuple[str, list[dict[str, Any]], str]]) -> bytes:
    """Training and evaluation loss per epoch of each (label, metrics, eval split name) run."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    drawn = False
    for i, (label, metrics, split) in enumerate(runs):
        for key, style, name in (("train_loss", "-", "train"), ("test_loss", "--", split)):
            x, y = _series(metrics, "epoch", key)
            if x:
                ax.plot(x, y, style, marker="o", color=_color(i), label=f"{label} {name}")
                drawn = True
    _finish_curves(ax, drawn, "loss", xlabel="epoch", ylabel="cross-entropy", title="Loss")
    _integer_ticks(ax)
    return _png(fig)


def accuracy_curves(runs: Sequence[tuple[str, list[dict[str, Any]], str]]) -> bytes:
    """Evaluation accuracy per epoch of each run."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    drawn = False
    for i, (label, metrics, split) in enumerate(runs):
        x, y = _series(metrics, "epoch", "test_acc")
        if x:
            ax.plot(x, [100 * v for v in y], marker="o", color=_color(i), label=f"{label} {split}")
            drawn = True
    _finish_curves(ax, drawn, "accuracy", xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    _integer_ticks(ax)
    return _png(fig)


def throughput(runs: Sequence[tuple[str, list[dict[str, Any]], str]]) -> bytes:
    """Training samples/s of each epoch, against the training time elapsed at its end."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    drawn = False
    for i, (label, metrics, _) in enumerate(runs):
        # Newer runs also record the rate of the training steps alone (without evaluation); prefer it.
        key = "train_samples_per_second" if any("train_samples_per_second" in m for m in metrics) \
            else "samples_per_second"
        x, y = _series(metrics, "elapsed_seconds", key)
        if x:
            ax.plot(x, y, marker="o", color=_color(i), label=label)
            drawn = True
    if drawn:
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
    _finish_curves(ax, drawn, "throughput", xlabel="training time elapsed (s)", ylabel="samples / s",
                   title="Training throughput per epoch")
    return _png(fig)


def confusion_matrix(matrix: torch.Tensor, classes: Sequence[str], title: str) -> bytes:
    """Counts of (true class, predicted class), each row shaded by its share of that class."""
    k = len(classes)
    side = min(12.0, 2.5 + 0.45 * k)
    fig = _figure(side, side)
    ax = fig.add_subplot()
    rows = matrix.double() / matrix.sum(1, keepdim=True).clamp_min(1)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_xticks(range(k), labels=classes, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), labels=classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if k <= ANNOTATE_MAX_CLASSES:
        for t in range(k):
            for p in range(k):
                count = int(matrix[t, p])
                if count:
                    ax.text(p, t, str(count), ha="center", va="center", fontsize=7,
                            color="white" if rows[t, p] > 0.5 else "black")
    return _png(fig)


def per_class_accuracy(runs: Sequence[tuple[str, torch.Tensor]], classes: Sequence[str]) -> bytes:
    """Accuracy of each class, one bar per (label, accuracies) run side by side."""
    k = len(classes)
    fig = _figure(min(14.0, 3 + 0.5 * k * max(1, len(runs) / 2)), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, (label, acc) in enumerate(runs):
        positions = [c - 0.4 + width * (i + 0.5) for c in range(k)]
        ax.bar(positions, (100 * acc).tolist(), width=width, color=_color(i), label=label)
    lowest = min(float(acc.min()) for _, acc in runs)
    ax.set_ylim(max(0.0, math.floor(100 * lowest / 5) * 5 - 5), 100)
    ax.set_xticks(range(k), labels=classes, rotation=90 if k > 10 else 0)
    ax.set(xlabel="class", ylabel="accuracy (%)", title="Per-class accuracy")
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")
    return _png(fig)


def worst_images(images: torch.Tensor, true: Sequence[str], predicted: Sequence[str], confidence: Sequence[float],
                 title: str) -> bytes:
    """A grid of uint8 images [N, C, H, W], each captioned with its predicted label, confidence and true label."""
    n = len(images)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(1.6 * cols, 1.9 * rows + 0.4)
    fig.suptitle(title)
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        _no_data(ax, "misclassified image")
        return _png(fig)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = images[i]
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy())
        ax.set_title(f"pred {predicted[i]} ({confidence[i]:.2f})\ntrue {true[i]}", fontsize=8, color="firebrick")
        ax.axis("off")
    return _png(fig)


def fewshot_accuracy(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> bytes:
    """Episodic accuracy against shots per class (K) of each (label, episode records) few-shot run: SimpleShot as a
    solid line, the plain mean dashed, each with its 95% confidence interval as error bars."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for i, (label, records) in enumerate(runs):
        records = sorted(records, key=lambda r: r["shots"])
        shots = [r["shots"] for r in records]
        for key, style, name in (("simpleshot", "-", "SimpleShot"), ("plain_mean", "--", "plain mean")):
            ax.errorbar(shots, [100 * r[key]["mean"] for r in records], yerr=[100 * r[key]["ci95"] for r in records],
                        fmt=style, marker="o", capsize=3, color=_color(i), label=f"{label} {name}")
    ways = sorted({r["ways"] for _, records in runs for r in records})
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["shots"] for _, records in runs for r in records}))
    ax.xaxis.set_major_formatter("{x:.0f}")
    _finish_curves(ax, True, "episodes", xlabel="shots per class (K)", ylabel="accuracy (%)",
                   title=f"Few-shot accuracy, {'/'.join(map(str, ways))}-way episodes (95% CI)")
    return _png(fig)
