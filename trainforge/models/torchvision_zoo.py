"""torchvision architectures adapted to small inputs (28x28 grayscale and up), trained from scratch."""

from __future__ import annotations

import math

from torch import nn

from .registry import register_model

# torchvision is imported inside the builders: the registry is loaded by every command, most of which never build
# one of these models, and the import costs seconds on a small machine.


@register_model("resnet18", default_recipe="resnet")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no stem max-pool, so 28x28 inputs keep their detail."""
    from torchvision import models as tvm

    net = tvm.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _small_vgg(net: nn.Module, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    first = net.features[0]
    net.features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
    # Each max-pool halves the side; drop the trailing ones that would shrink the map below 1x1.
    pools = [i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
    keep = max(0, min(len(pools), int(math.log2(image_size))))
    for i in reversed(pools[keep:]):
        net.features[i] = nn.Identity()
    # The 7x7x512 -> 4096 ImageNet head would hold 100M parameters for a 28x28 input; pool to 1x1 instead.
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                   nn.Linear(512, num_classes))
    return net


@register_model("vgg16", default_recipe="vgg")
def vgg16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision VGG-16 with pools limited to the input size and a 512-wide head."""
    from torchvision import models as tvm

    return _small_vgg(tvm.vgg16(), in_channels, image_size, num_classes)


@register_model("vgg16_bn", default_recipe="vgg")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """VGG-16 with batch normalization, adapted like `vgg16`; trains far more easily from scratch."""
    from torchvision import models as tvm

    return _small_vgg(tvm.vgg16_bn(), in_channels, image_size, num_classes)
