"""Pruning: structured (whole channels removed with torch-pruning, so the network really shrinks) and unstructured
(individual weights of smallest magnitude zeroed, which shrinks nothing dense but reports the sparsity reached)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import DeployError


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _output_layer(model: nn.Module) -> nn.Module:
    # The last conv/linear produces the logits; removing its channels would remove classes.
    layers = _prunable(model)
    if not layers:
        raise DeployError("the model has no Conv2d or Linear layers to prune")
    return layers[-1][1]


def prune_channels(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """A copy of `model` with `ratio` of the output channels of every hidden conv/linear layer removed (the L2-norm
    least important groups, with BatchNorm and consumers pruned consistently by torch-pruning's dependency graph)."""
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise DeployError(f"--prune must be a fraction between 0 and 1 (exclusive), got {ratio}")
    pruned = copy.deepcopy(model).cpu().eval()
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[_output_layer(pruned)])
    pruner.step()
    return pruned


def apply_magnitude_masks(model: nn.Module, ratio: float) -> None:
    """Masks the `ratio` smallest-magnitude weights of all conv/linear layers (one global threshold) in place.

    The masks stay attached (as forward pre-hooks) so that a fine-tune keeps the pruned weights at zero; call
    `make_masks_permanent` afterwards.
    """
    if not 0.0 < ratio < 1.0:
        raise DeployError(f"--prune must be a fraction between 0 and 1 (exclusive), got {ratio}")
    # torch's global pruning flattens the weights with .view, which channels-last convolution weights refuse.
    model.to(memory_format=torch.contiguous_format)
    targets = [(m, "weight") for _, m in _prunable(model)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=ratio)


def make_masks_permanent(model: nn.Module) -> None:
    for _, module in _prunable(model):
        if torch_prune.is_pruned(module):
            torch_prune.remove(module, "weight")


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Fraction of exactly-zero weights per conv/linear layer and over all of them."""
    layers, zeros, total = {}, 0, 0
    for name, module in _prunable(model):
        weight = module.weight.detach()
        z, n = int((weight == 0).sum()), weight.numel()
        layers[name] = {"weights": n, "zeros": z, "sparsity": z / n}
        zeros, total = zeros + z, total + n
    return {"layers": layers, "weights": total, "zeros": zeros, "sparsity": zeros / max(1, total)}
