"""Prototypes from embeddings, episodic evaluation on cached embeddings, and the short fits of `--adapt`.

Everything here works on features already computed: a pool of images is embedded once, and any number of episodes
(or prototype sets) are drawn from the cached features, so hundreds of episodes cost seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import torch
from torch.nn import functional as F

from ..errors import DataError
from ..models.fewshot import prototype_layer

# How features are normalised before prototypes are taken: SimpleShot's centring (on the support set's mean) and L2
# normalisation, L2 alone, or none (the plain mean of prototypical networks).
NORMS = ("cl2n", "l2n", "none")
# Two-sided 95% normal quantile, for the confidence interval of a mean over episodes.
Z95 = 1.959964


def normalize(features: torch.Tensor, norm: str, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Features [..., D] normalised as `norm` says; "cl2n" centres on `mean` (default: the mean of [N, D] features)."""
    if norm == "cl2n":
        features = features - (features.mean(0) if mean is None else mean)
    elif norm == "none":
        return features
    elif norm != "l2n":
        raise ValueError(f"unknown normalisation {norm!r}; expected one of {NORMS}")
    return F.normalize(features, dim=-1)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The mean feature of each class 0..num_classes-1: prototypes [C, D]."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    return sums / torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1).to(features.dtype)


def nearest_prototype(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The index of the nearest prototype (Euclidean) of each query, through the same linear layer the
    registered classifier uses; queries [..., M, D] and prototypes [..., C, D] may carry a batch of episodes."""
    weight, bias = prototype_layer(prototypes)
    return (queries @ weight.transpose(-1, -2) + bias.unsqueeze(-2)).argmax(-1)


def per_class_sample(labels: torch.Tensor, k: int, seed: int, classes: list[str], where: str) -> torch.Tensor:
    """Indices of exactly `k` seeded random samples of every class, class by class; a DataError names a class
    with fewer."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c, name in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < k:
            raise DataError(f"{where}: class {name!r} has {len(idx)} images, fewer than the {k} asked for")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(chosen)


@dataclasses.dataclass
class Episode:
    """One N-way K-shot episode: indices into a pool, and labels 0..N-1 in the order of the sampled classes."""

    classes: torch.Tensor
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


def sample_episodes(labels: torch.Tensor, ways: int, shots: int, queries: int, count: int, seed: int,
                    classes: list[str]) -> list[Episode]:
    """`count` seeded episodes from a pool with these `labels`: `ways` random classes, `shots` support and
    `queries` query images of each, disjoint. The same arguments give the same episodes."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(len(classes))]
    for name, idx in zip(classes, by_class):
        if len(idx) < shots + queries:
            raise DataError(f"class {name!r} has {len(idx)} images in the pool, and {shots}-shot episodes with "
                            f"{queries} queries need {shots + queries}: raise --pool or lower --queries")
    if not 2 <= ways <= len(classes):
        raise DataError(f"--ways {ways}: episodes need between 2 and the {len(classes)} classes of the data")
    gen = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        chosen = torch.randperm(len(classes), generator=gen)[:ways]
        picks = [by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:shots + queries]] for c in chosen]
        support = torch.stack([p[:shots] for p in picks])
        query = torch.stack([p[shots:] for p in picks])
        ids = torch.arange(ways)
        episodes.append(Episode(chosen, support.flatten(), ids.repeat_interleave(shots), query.flatten(),
                                ids.repeat_interleave(queries)))
    return episodes


def episode_accuracies(features: torch.Tensor, episodes: list[Episode], norm: str,
                       chunk: int = 100) -> list[float]:
    """Nearest-prototype accuracy on each episode's queries, with features normalised by `norm` (centred on the
    support set's mean for "cl2n": all a classifier knows when it is made). Episodes of one shape run as a batch,
    `chunk` at a time."""
    accuracies: list[float] = []
    for start in range(0, len(episodes), chunk):
        part = episodes[start:start + chunk]
        support = features[torch.stack([e.support for e in part])]
        mean = support.mean(1, keepdim=True)
        # Support images are stored class by class, so the prototypes are means over equal runs.
        protos = normalize(support, norm, mean).unflatten(1, (len(part[0].classes), -1)).mean(2)
        predicted = nearest_prototype(normalize(features[torch.stack([e.query for e in part])], norm, mean), protos)
        labels = torch.stack([e.query_labels for e in part])
        accuracies += (predicted == labels).double().mean(1).tolist()
    return accuracies


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "ci95": Z95 * std / math.sqrt(n)}


def fit_linear(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
               scale: float = 1.0, steps: int | None = 100, lr: float = 1e-2,
               stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Trains the linear layer (weight [C, D], bias [C]) on `features` [N, D] for `steps` full-batch AdamW steps of
    cross-entropy on `scale` times its outputs (or, with `stop`, until it says so); returns the new weight and bias,
    and the loss before and after."""
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)

    def loss() -> torch.Tensor:
        return F.cross_entropy(torch.addmm(bias, features, weight.t()) * scale, labels)
    with torch.enable_grad():
        before = loss().item()
        for _ in itertools.count() if steps is None else range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
            if stop is not None and stop():
                break
        after = loss().item()
    return weight.detach(), bias.detach(), (before, after)
