"""Small fast networks for 28x28-class images: the reference linear model, an MLP and a CNN."""

from __future__ import annotations

from torch import nn

from .registry import register_model


@register_model("linear", default_recipe="reference")
def linear(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Multinomial logistic regression on the pixels (the project's reference model)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


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
    return nn.Sequential(
        conv_bn(in_channels, w1), nn.MaxPool2d(2),
        conv_bn(w1, w2), nn.MaxPool2d(2),
        conv_bn(w2, w2), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(w2, num_classes),
    )
