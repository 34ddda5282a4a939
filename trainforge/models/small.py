"""Small fast networks for 28x28-class images: the reference linear model, an MLP and two CNNs.

The conv nets are built with channels-last weights, which makes every conv and pooling layer after them run
channels-last too: on the 2-core AVX-512 CPU measured here (oneDNN) a training step of the peer MNIST net took 38 ms
instead of 66 ms that way, and on NVIDIA GPUs it is the layout tensor cores want (the loop converts there anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .registry import register_model


class FewOutputLinear(nn.Linear):
    """nn.Linear computed as weight @ x.T, the same numbers and parameters in another layout.

    With a handful of outputs and hundreds of inputs (784 -> 10), x @ weight.T is a skinny product that BLAS runs
    poorly; weight @ x.T is its wide transpose and ran 1.2x (2 threads) to 1.9x (1 thread) faster on the CPU here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()


@register_model("linear", default_recipe="reference")
def linear(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Multinomial logistic regression on the pixels (the project's reference model)."""
    return nn.Sequential(nn.Flatten(), FewOutputLinear(in_channels * image_size * image_size, num_classes))


@register_model("mlp", default_recipe="mlp")
def mlp(num_classes: int, in_channels: int, image_size: int, width: int = 256) -> nn.Module:
    """Two hidden ReLU layers of `width` units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


def conv_bn(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


@register_model("cnn", default_recipe="cnn")
def cnn(num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU-pool stages (width, 2x, 2x channels) and a linear head on global max pooling."""
    w1, w2 = width, 2 * width
    net = nn.Sequential(
        conv_bn(in_channels, w1), nn.MaxPool2d(2),
        conv_bn(w1, w2), nn.MaxPool2d(2),
        conv_bn(w2, w2), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(w2, num_classes),
    )
    return net.to(memory_format=torch.channels_last)


@register_model("speedrun_cnn", default_recipe="speedrun")
def speedrun_cnn(num_classes: int, in_channels: int, image_size: int, width: int = 16) -> nn.Module:
    """The fastest net to 99% on MNIST (`--recipe speedrun`): two conv-pool-BN-ReLU stages and a 128-unit head.

    The peer recipe's layout (5x5 conv, pool, 3x3 conv, pool, two linear layers) made cheaper where the time goes
    on a CPU: fewer channels on the full-resolution map (the first conv and its pooling dominate a step), batch
    norm after pooling (on a quarter of the pixels), and a narrower hidden layer. See train/recipes.py for evidence.
    """
    first = (image_size - 4) // 2
    side = (first - 2) // 2
    if side < 1:
        raise ModelError(f"speedrun_cnn needs images of at least 12x12 pixels, got {image_size}x{image_size}")
    w1, w2 = width, 2 * width
    net = nn.Sequential(
        nn.Conv2d(in_channels, w1, 5, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        nn.Conv2d(w1, w2, 3, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(w2 * side * side, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
    )
    return net.to(memory_format=torch.channels_last)
