"""Few-shot prototype classifiers: a pretrained encoder, then SimpleShot normalisation and nearest prototype.

    logits = scale * (z @ P.T - |P|^2 / 2),   z = (f - mean) / |f - mean|,   f = encoder(image)

The mean is frozen when the classifier is made (the centring of SimpleShot, Wang et al. 2019); P holds one prototype
per class, the mean of the normalised features of its labelled images (prototypical networks, Snell et al. 2017).
`z @ p - |p|^2 / 2` is `(|z|^2 - |z - p|^2) / 2`, so the largest logit is the nearest prototype and the whole head
is one nn.Linear whose rows are the prototypes: `trainforge.load()` rebuilds it, ONNX exports it, and a class is
added by appending a row.

Every registered architecture X gets a twin `fewshot_X` (X's network with its last nn.Linear removed, then this
head), registered when the built-in families load. An architecture registered later gets its twin from
`fewshot_arch(X)`, which `trainforge fewshot` calls; a run made from it loads in a new process once X is registered
before the first model look-up (as any user model must be).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError
from . import registry

PREFIX = "fewshot_"
# Softmax temperature of the logits: the logit gap between two classes is `scale` times a difference of squared
# distances on the unit sphere (at most 2), so the default 1.0 would leave every confidence near 1 / classes.
DEFAULT_SCALE = 10.0


class PrototypeHead(nn.Module):
    """Centring with a frozen mean, L2 normalisation, and a linear layer whose rows are class prototypes."""

    def __init__(self, features: int, num_classes: int, scale: float = DEFAULT_SCALE):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.linear = nn.Linear(features, num_classes)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, D] -> the centred, unit-length vectors the prototypes live among."""
        return F.normalize(features - self.mean, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.normalize(features)) * self.scale

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor, rows: slice = slice(None)) -> None:
        """Writes prototypes [C, D] (in the normalised space) into `rows` of the layer."""
        weight, bias = prototype_layer(prototypes)
        self.linear.weight[rows] = weight
        self.linear.bias[rows] = bias


def prototype_layer(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of the linear layer whose largest output is the nearest of `prototypes` [..., C, D]."""
    return prototypes, -0.5 * prototypes.pow(2).sum(-1)


class FewShotNet(nn.Module):
    """An encoder (images -> features [N, D]) followed by a PrototypeHead."""

    def __init__(self, encoder: nn.Module, features: int, num_classes: int):
        super().__init__()
        # Channels-last weights make every conv after them run channels-last: EfficientNet-Lite0 embedded 1.6x as
        # many images per second at 128 px on the CPU (benchmarks/RESULTS.md, "Few-shot").
        self.encoder = encoder.to(memory_format=torch.channels_last)
        self.head = PrototypeHead(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def strip_head(net: nn.Module) -> tuple[nn.Module, int]:
    """`net` with its last registered nn.Linear replaced by nn.Identity, and that layer's input width: the network
    then returns its penultimate features."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(net).__name__} has no nn.Linear layer whose input could serve as features")
    name, layer = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, nn.Identity())
    return net, layer.in_features


def fewshot_arch(encoder: str) -> str:
    """The registered name of the prototype classifier on `encoder` (a registered architecture), registering it
    if needed."""
    name = PREFIX + encoder
    if name not in registry.list_models():
        _register_twin(registry.model_entry(encoder))
    return name


def encoder_arch(name: str) -> str | None:
    """The encoder architecture of a prototype classifier's registered name; None for any other name."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def _register_twin(entry: registry.ModelEntry) -> None:
    encoder = entry.name

    def build(num_classes: int, in_channels: int, image_size: int, width: int | None = None) -> nn.Module:
        net = registry.create_model(encoder, num_classes=1, in_channels=in_channels, image_size=image_size,
                                    width=width)
        return FewShotNet(*strip_head(net), num_classes)
    build.__doc__ = f"Few-shot prototypes on the penultimate features of {encoder} (made by `trainforge fewshot`)."
    registry.register_model(PREFIX + encoder, default_recipe=entry.default_recipe, image_size=entry.image_size,
                            in_channels=entry.in_channels, mean=entry.mean, std=entry.std)(build)


# The look-up loads the built-in families first, also when this module is imported before them (by a verb); while
# the registry imports this module itself, its import of it finds the module already in progress.
for _name in registry.list_models():
    if encoder_arch(_name) is None:
        fewshot_arch(_name)
