"""Knowledge distillation: the student learns the teacher's softened output distribution as well as the labels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def distillation_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
    """`loss_fn(logits, labels, images)` for the training loop (Hinton et al. 2015).

    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy; the T^2 factor keeps the soft term's
    gradients on the scale of the hard one as the temperature changes.
    """
    teacher.eval()

    def loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images).float()
        soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(target / temperature, dim=1),
                        reduction="batchmean", log_target=True)
        return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(logits, labels)
    return loss
