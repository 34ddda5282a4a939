"""Small fast networks for 28x28-class images: the reference linear model, an MLP and three CNNs.

The conv nets are built with channels-last weights, which makes every conv and pooling layer after them run
channels-last too: on the 2-core AVX-512 CPU measured here (oneDNN) a training step of the peer MNIST net took 38 ms
instead of 66 ms that way, and on NVIDIA GPUs it is the layout tensor cores want (the loop converts there anyway).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .registry import FlipAveraged, register_model


class FewOutputLinear(nn.Linear):
    """nn.Linear computed as weight @ x.T, the same numbers and parameters in another layout.

    With a handful of outputs and hundreds of inputs (784 -> 10), x @ weight.T is a skinny product that BLAS runs
    poorly; weight @ x.T is its wide transpose and ran 1.2x (2 threads) to 1.9x (1 thread) faster on the CPU here.
    """

    # Classifier passes this layer the un-normalized pixels and the normalization, see forward.
    folds_input_affine = True

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on `x`, or, given a per-feature `scale` and `shift`, on `x * scale + shift` with that affine map
        folded into the weights: W (s x + t) + b = (W s) x + (W t + b). Normalizing the batch costs two passes over
        it (a sixth of a training step of the reference recipe on the CPU); folding costs two over the 10 x 784
        weights. Autograd carries the gradients to the same parameters, so training is the same up to rounding."""
        weight, bias = self.weight, self.bias
        if scale is not None and shift is not None:
            bias = torch.addmv(bias, weight, shift)
            weight = weight * scale
            # Only on this path: the plain one is what export and tracing see, and must stay plain aten ops.
            if _use_onednn(x, weight):
                return (OneDNNWeightTimesInput.apply(weight, x) + bias.unsqueeze(1)).t()
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


class OneDNNWeightTimesInput(torch.autograd.Function):
    """weight @ x.T ([outputs, N]) and its gradients through oneDNN's matmul instead of MKL's sgemm.

    For 10 outputs (the linear model at batch 2048, 2 threads of an AVX-512 CPU) MKL runs the forward product at
    0.47 ms and the weight gradient at 0.43 ms, about 70 GFLOP/s: with so few rows its sgemm spends most of the time
    packing the batch. oneDNN's kernels took 0.32 and 0.19 ms for the same numbers (to rounding). The result stays
    class-major like `forward`'s, for the loss (see train/loop.py: cross_entropy). PyTorch reaches oneDNN's fp32
    matmul only through this operator (the one its compiler's CPU fusions call), so it runs only where
    `_use_onednn` has checked that it exists and works, and never while tracing or compiling.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, x)
        return torch.ops.mkldnn._linear_pointwise(weight, x, None, "none", [], "")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weight, x = ctx.saved_tensors
        # grad @ x, as a "linear" with x.T as its weight: the strided view is what the kernel reads fastest (0.19 ms
        # against 0.29 ms for a contiguous copy of x.T).
        grad_weight = (torch.ops.mkldnn._linear_pointwise(grad.contiguous(), x.t(), None, "none", [], "")
                       if ctx.needs_input_grad[0] else None)
        grad_x = grad.t() @ weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_x


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 2
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _onednn_linear_works())


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this build of PyTorch has oneDNN's linear operator and it computes x @ w.T + b."""
    try:
        x, w, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.arange(4.0)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.backends.mkldnn.is_available() and torch.equal(out, torch.addmm(b, x, w.t()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


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


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU, as in airbench's CIFAR-10 net: the second convolution
    and all normalization run on the pooled map, a quarter of the pixels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register_model("fashion_cnn", default_recipe="fashion")
def fashion_cnn(num_classes: int, in_channels: int, image_size: int, width: int = 24) -> nn.Module:
    """Three conv groups (width, 2x, 4x channels) and a linear head; averages each image with its mirror image.

    airbench's layout for 28x28 images; evaluated on the image and its left-right mirror (`FlipAveraged`), so it
    suits classes that look the same mirrored, as clothing does and digits do not. See train/recipes.py for evidence.
    """
    if image_size < 8:
        raise ModelError(f"fashion_cnn needs images of at least 8x8 pixels, got {image_size}x{image_size}")
    w1, w2, w3 = width, 2 * width, 4 * width
    net = nn.Sequential(
        ConvGroup(in_channels, w1), ConvGroup(w1, w2), ConvGroup(w2, w3),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        # A small output scale keeps the early logits small, as in airbench (its 1/9).
        nn.Linear(w3, num_classes, bias=False), Scale(1 / 9),
    )
    return FlipAveraged(net.to(memory_format=torch.channels_last))
