"""`--adapt`: a short fine-tune of a prototype classifier on its own shots, starting from the prototypes.

The head alone trains on the cached features of the shots (no image passes through the encoder again); with
`--lora-rank R` LoRA adapters on the encoder train too, and are merged into its weights afterwards, so the result is
the same registered architecture. The centring mean stays as it was frozen, and the encoder stays in eval mode
(its batch-norm statistics are not re-estimated from a handful of images).
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch.nn import functional as F

from ..models import Classifier
from ..train.device import autocast
from .prototypes import fit_linear

# LoRA's scale alpha / rank as fine-tuning's defaults have it (alpha 16 at rank 8).
LORA_ALPHA_PER_RANK = 2.0
# Shots per step of the LoRA fit: all of them up to this, else a seeded random batch.
LORA_BATCH = 64


def adapt_head(model: Classifier, features: torch.Tensor, labels: torch.Tensor, steps: int | None, lr: float,
               stop: Callable[[], bool] | None = None) -> tuple[float, float]:
    """Fits the prototype rows and biases to the shots' encoder `features` for `steps` steps (or until `stop`
    says so); returns the shots' loss before and after."""
    head = model.net.head
    weight, bias, losses = fit_linear(head.normalize(features), labels, head.linear.weight, head.linear.bias,
                                      scale=float(head.scale), steps=steps, lr=lr, stop=stop)
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(bias)
    return losses


def adapt_lora(model: Classifier, images: torch.Tensor, labels: torch.Tensor, *, rank: int, steps: int | None,
               lr: float, device: torch.device, precision: str, seed: int,
               stop: Callable[[], bool] | None = None) -> tuple[float, float]:
    """Trains LoRA adapters on the encoder and the prototype layer on the shots' images for `steps` steps (or until
    `stop` says so), then merges the adapters; returns the loss of the first and the last step."""
    from ..finetune.strategies import apply_lora, merge_lora

    model.net = apply_lora(model.net, "head.linear", rank, LORA_ALPHA_PER_RANK * rank, 0.0, None)
    model.to(device).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in itertools.count() if steps is None else range(steps):
            batch = torch.randperm(len(labels), generator=gen)[:LORA_BATCH]
            with autocast(device, precision):
                logits = model(images[batch].to(device))
            loss = F.cross_entropy(logits.float(), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if stop is not None and stop():
                break
    finally:
        model.net = merge_lora(model.net)
        model.cpu().requires_grad_(True)
    return losses[0], losses[-1]
