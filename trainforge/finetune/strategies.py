"""What a fine-tuning strategy trains: a new head, frozen or unfrozen backbone blocks, LoRA adapters, and the
optimizer groups with a lower learning rate for the backbone.

Frozen means frozen entirely: a normalization layer whose parameters do not train also keeps its running
statistics (it stays in eval mode while the model trains), so a frozen backbone computes exactly what it did before.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..models import Classifier

STRATEGIES = ("full", "linear-probe", "lora", "gradual")


class FinetuneClassifier(Classifier):
    """A Classifier whose frozen normalization layers stay in eval mode; its state dict is a Classifier's."""

    def train(self, mode: bool = True) -> "FinetuneClassifier":
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase) and not _trains(module):
                    module.eval()
        return self


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def replace_head(net: nn.Module, name: str, num_classes: int, keep: int = 0) -> nn.Linear:
    """Swaps the Linear at `name` for a freshly initialised one with `num_classes` outputs.

    The first `keep` outputs take the old head's weights (the old task's classes when a model is extended).
    """
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old: nn.Linear = getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if keep:
        with torch.no_grad():
            new.weight[:keep] = old.weight[:keep]
            if old.bias is not None:
                new.bias[:keep] = old.bias[:keep]
    setattr(parent, attr, new)
    return new


def freeze_backbone(net: nn.Module, head: nn.Module) -> None:
    """Only the head's parameters train."""
    net.requires_grad_(False)
    head.requires_grad_(True)


def backbone_groups(model: nn.Module, head: nn.Module, lr: float, backbone_lr_mult: float
                    ) -> Callable[[nn.Module], list[dict]]:
    """Optimizer groups: the head at `lr`, every other parameter at `lr * backbone_lr_mult`.

    Frozen parameters are included on purpose: they have no gradient, so the optimizer skips them until gradual
    unfreezing turns them on.
    """
    def groups(_: nn.Module) -> list[dict]:
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in model.parameters() if id(p) not in head_ids]
        out = [{"params": list(head.parameters()), "lr": lr}]
        if backbone:
            out.insert(0, {"params": backbone, "lr": lr * backbone_lr_mult})
        return out
    return groups


def lora_candidates(net: nn.Module, head: str) -> list[str]:
    """Layers LoRA can adapt: every Linear and dense Conv2d outside the head.

    Depthwise convolutions are left out: their kernel is k x k per channel, which a rank-r update cannot shrink.
    """
    return [name for name, m in net.named_modules()
            if name != head and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]


def apply_lora(net: nn.Module, head: str, rank: int, alpha: float, dropout: float, targets: str | None) -> nn.Module:
    """Wraps `net` with PEFT LoRA adapters on the target layers; only adapters and the head train.

    `targets` is a comma-separated list of regular expressions matched against whole module names (default: every
    candidate layer). Returns the PEFT model; `merge_lora` folds the adapters back into a plain network.
    """
    from peft import LoraConfig, get_peft_model

    candidates = lora_candidates(net, head)
    if targets:
        chosen = []
        for pattern in (p.strip() for p in targets.split(",") if p.strip()):
            try:
                matched = [n for n in candidates if re.fullmatch(pattern, n)]
            except re.error as exc:
                raise ConfigError(f"--lora-targets: {pattern!r} is not a valid regular expression ({exc})") from None
            if not matched:
                raise ConfigError(f"--lora-targets: {pattern!r} matches no Linear/Conv2d layer; layers: "
                                  f"{', '.join(candidates[:12])}" + (" ..." if len(candidates) > 12 else ""))
            chosen += [n for n in matched if n not in chosen]
    else:
        chosen = candidates
    if not chosen:
        raise ConfigError("--strategy lora: the model has no Linear/Conv2d layer besides its head to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen)
    peft_model = get_peft_model(net, config)
    peft_model.get_submodule(f"base_model.model.{head}").requires_grad_(True)
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """The base network with every adapter folded into its weights (W + B A * alpha / r): a plain architecture."""
    return peft_model.merge_and_unload()


def gradual_units(net: nn.Module, head: str) -> list[nn.Module]:
    """The backbone's blocks in forward order: top-level children, with a child opened when it holds several
    weight-bearing blocks (a stage of residual blocks, a VGG feature stack) rather than one conv with its norm.

    E.g. EfficientNet-Lite0: stem conv, stem norm, 16 MBConv blocks, head conv, head norm; ResNet: conv1, bn1 and
    the 8 basic blocks of layer1..layer4; the small cnn: its three conv-BN-ReLU stages.
    """
    head_module = net.get_submodule(head)

    def weighty(m: nn.Module) -> bool:
        return any(isinstance(x, (nn.Conv2d, nn.Linear)) and x is not head_module for x in m.modules())

    units: list[nn.Module] = []
    for child in net.children():
        parts = [p for p in child.children() if weighty(p)]
        opened = parts if len(parts) > 1 or any(m is head_module for m in child.modules()) else [child]
        units += [p for p in opened if p is not head_module and any(True for _ in p.parameters())]
    return units


class GradualUnfreezer:
    """Unfreezes the backbone from the top in `stages` steps, one every `steps_per_stage` optimizer steps.

    Stage 0 trains the head alone; stage s (1..stages) also trains the top s/stages of the blocks. It runs as a
    forward pre-hook that counts training forwards (one per optimizer step), so the training loop needs no hook.
    """

    def __init__(self, units: list[nn.Module], stages: int, steps_per_stage: int):
        self.units = units
        self.stages = max(1, min(stages, len(units)))
        self.steps_per_stage = max(1, steps_per_stage)
        self.step = 0
        self.stage = 0
        for unit in units:
            unit.requires_grad_(False)

    def attach(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if not module.training:
            return
        target = min(self.stages, self.step // self.steps_per_stage)
        while self.stage < target:
            self.stage += 1
            first = len(self.units) - math.ceil(self.stage * len(self.units) / self.stages)
            for unit in self.units[first:]:
                unit.requires_grad_(True)
                unit.train()
        self.step += 1
