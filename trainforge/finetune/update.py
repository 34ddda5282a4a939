"""Updating a trained model on a new task without forgetting the old one (`finetune --update`).

The updated model has one head over both label sets: task A's classes first (its old head rows are kept), then task
B's. Two mitigations of forgetting, usable together:
  replay   N class-balanced task-A training images mixed into every epoch, with their A labels;
  distill  Learning without Forgetting: a penalty that keeps the model's A logits on the training images close to
           what the original model gave (KL divergence of temperature-softened outputs).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import runs
from ..data import DataBundle, ImageSet, balanced_subset
from ..errors import ConfigError


@dataclasses.dataclass
class Tasks:
    """The old task's data, the mixed training bundle, and the test sets of both tasks in the joint label space."""

    old: DataBundle
    mixed: DataBundle
    old_test: ImageSet
    new_test: ImageSet
    classes: list[str]
    offset: int


def load_old_task(run_dir: Path) -> DataBundle:
    """The data the source run was trained on, as its saved config names it."""
    return runs.load_run_data(run_dir).dataset


def conform(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """uint8 images converted to the channels and size of `like`, so two tasks' images can share a batch."""
    if images.shape[1:] == like.shape[1:]:
        return images
    x = images.float()
    channels = like.shape[1]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != like.shape[-2:]:
        x = F.interpolate(x, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def joint_tasks(old: DataBundle, old_classes: list[str], new: DataBundle, replay: int, seed: int) -> Tasks:
    """Task B's training set (labels offset past A's classes) plus `replay` task-A images; both test sets."""
    offset = len(old_classes)
    if len(old.classes) != offset:
        raise ConfigError(f"--update: the source run's model has {offset} classes but its data {old.name} has "
                          f"{len(old.classes)}")
    taken = set(old_classes)
    # Label names must stay unique across the joint head.
    new_names = [c if c not in taken else f"{new.name}:{c}" for c in new.classes]
    classes = list(old_classes) + new_names
    images = new.train.images
    labels = new.train.labels + offset
    if replay:
        idx = balanced_subset(old.train.labels, replay, seed)
        images = torch.cat([images, conform(old.train.images[idx], images)])
        labels = torch.cat([labels, old.train.labels[idx]])
    old_test = ImageSet(conform(old.test.images, new.test.images), old.test.labels, classes)
    new_test = ImageSet(new.test.images, new.test.labels + offset, classes)
    both_test = ImageSet(torch.cat([old_test.images, new_test.images]), torch.cat([old_test.labels, new_test.labels]),
                         classes)
    mixed = DataBundle(new.name, ImageSet(images, labels, classes), both_test, new.mean, new.std)
    return Tasks(old, mixed, old_test, new_test, classes, offset)


def distillation_loss(old_model: nn.Module, old_classes: int, weight: float, temperature: float,
                      label_smoothing: float):
    """`loss_fn(logits, labels, images)` for the training loop: cross-entropy plus the LwF penalty.

    The penalty is T^2 * KL(softmax(old / T) || softmax(new[:, :A] / T)), with the frozen original model's logits
    computed on the same batch; T^2 keeps its gradient scale independent of T.
    """
    teacher = copy.deepcopy(old_model).eval().requires_grad_(False)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            target = F.softmax(teacher(images).float() / temperature, dim=1)
        student = F.log_softmax(logits[:, :old_classes] / temperature, dim=1)
        kd = F.kl_div(student, target, reduction="batchmean") * temperature ** 2
        return ce + weight * kd
    return loss_fn
