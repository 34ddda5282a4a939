"""The model registry: `@register_model` on a builder function, `create_model(name, ...)` to build one.

A registry entry carries the model's input contract (image size, channels, normalization) and the recipe that trains
it well, so training, `load()`, export and serving all read the same facts.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from torch import nn

from ..errors import ModelError


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    default_recipe: str
    description: str
    # A model that needs a fixed input (pretrained nets) names it; None means "whatever the data has".
    image_size: int | None = None
    in_channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str | None = None, *, default_recipe: str = "default", image_size: int | None = None,
                   in_channels: int | None = None, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> Callable:
    """Registers `builder(num_classes, in_channels, image_size, width=None) -> nn.Module` under `name`.

    User models plug in the same way as the built-in ones.
    """
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(key, builder, default_recipe, doc[0] if doc else "", image_size, in_channels,
                                    mean, std)
        return builder
    return decorate


def model_entry(name: str) -> ModelEntry:
    _load_builtin_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    _load_builtin_families()
    return sorted(_REGISTRY)


def effective_width(name: str, width: int | None) -> int | None:
    """The width `create_model(name, width=width)` builds with: the given one, else the builder's default.

    Runs record this rather than None, so a later change of a default cannot break loading an older run.
    """
    if width is not None:
        return width
    parameter = inspect.signature(model_entry(name).builder).parameters.get("width")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 width: int | None = None) -> nn.Module:
    """Builds the bare network `name` (no preprocessing): float input [N, in_channels, image_size, image_size]."""
    entry = model_entry(name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    kwargs = {} if width is None else {"width": width}
    try:
        return entry.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    except TypeError as exc:
        if width is not None and "width" in str(exc):
            raise ModelError(f"model {name!r} takes no width") from None
        raise


class Preprocess(nn.Module):
    """Raw uint8 images [N, C, H, W] -> the float input a network was trained on.

    Channel adaptation, resizing and normalization live inside the model so that training, `load()`, ONNX export and
    serving apply exactly the same arithmetic.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], in_channels: int, image_size: int):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ModelError(f"mean/std need {in_channels} values each, got {len(mean)} and {len(std)}")
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Convert once, then scale and shift in place: two passes fewer than out-of-place arithmetic, which for a
        # linear model was a fifth of a training step on the CPU (fresh: a float input is never modified).
        return self.pixels(images, fresh=True).mul_(self.scale).add_(self.shift)

    def pixels(self, images: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The images as float32 in 0-255, with the model's channels and size, not yet normalized; `fresh`: a new
        tensor even when `images` is already that."""
        x = images if images.dtype in (torch.uint8, torch.float32) else images.float()
        channels = x.shape[1]
        if torch.compiler.is_exporting():
            # An exported graph takes images of any size, so it always resizes (an identity at the model's size).
            x = self._adapt(x.float(), channels, always_resize=True)
        elif channels != self.in_channels or x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = self._adapt(x.float(), channels)
        # The copy also materializes a grayscale image expanded to three channels, which the in-place
        # normalization would otherwise scale once per channel in an exported graph.
        return x.to(torch.float32, copy=fresh)

    def feature_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalization as (scale, shift) per flattened input feature (C * H * W values each)."""
        shape = (1, self.in_channels, self.image_size, self.image_size)
        return self.scale.expand(shape).reshape(-1), self.shift.expand(shape).reshape(-1)

    def _adapt(self, x: torch.Tensor, channels: int, always_resize: bool = False) -> torch.Tensor:
        # Resized while it has the fewer channels: a grayscale image is resized once, not once per copy.
        if channels == 1 and self.in_channels != 1:
            return self._resize(x, always_resize).expand(-1, self.in_channels, -1, -1)
        if channels != self.in_channels:
            if channels == 3 and self.in_channels == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise ModelError(f"cannot adapt {channels}-channel images to a {self.in_channels}-channel model")
        return self._resize(x, always_resize)

    def _resize(self, x: torch.Tensor, always: bool = False) -> torch.Tensor:
        if always or x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = resize_images(x, (self.image_size, self.image_size))
        return x


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float images [N, C, H, W] resized to `size` (height, width): the one resize of every path (training data,
    `load()`, exported graphs, serving), bilinear with antialiasing so that large images are averaged, not sampled.

    Antialiased resizing exports as ONNX Resize with antialias=1 (opset 18 and later), which ONNX Runtime runs.
    """
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature`; the logits themselves (no extra graph node) at temperature 1."""
    return logits if temperature == 1.0 else logits / temperature


class Classifier(nn.Module):
    """Preprocessing followed by a network: takes raw uint8 images, returns logits."""

    def __init__(self, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.net = net
        # Set from a calibrated run's model.json by `runs.build_model`; part of the forward pass, so that load(),
        # export and serving all see the calibrated probabilities. A constant, not a weight: training leaves it.
        self.temperature = 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        head = self._normalizing_head()
        if head is not None:
            # Called as a module, so that hooks on it (FSDP gathering its shards) run.
            logits = head(self.preprocess.pixels(images).flatten(1), *self.preprocess.feature_affine())
        else:
            logits = self.net(self.preprocess(images))
        return tempered(logits, self.temperature)

    def _normalizing_head(self) -> nn.Module | None:
        """The net's only layer after a flatten, when it can apply the normalization itself (see
        `FewOutputLinear.forward`). Only while training or under inference mode (evaluation, prediction): when
        a model is exported, traced or quantized, every layer runs as its own module, so that tools which trace or
        swap modules see them."""
        net = self.net
        if ((self.training or torch.is_inference_mode_enabled()) and isinstance(net, nn.Sequential) and len(net) == 2
                and type(net[0]) is nn.Flatten and getattr(net[1], "folds_input_affine", False)):
            return net[1]
        return None


class FlipAveraged(nn.Module):
    """A network that, outside training, averages its logits over each image and its left-right mirror image.

    Part of the model rather than of an evaluation routine, so that `load()`, export and serving give the same
    predictions as the evaluation during training, and pay the same second forward pass. Both views run as one
    batch of 2N. Only for classes that look the same mirrored (clothing, most photos), never digits or text.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.net(x)
        return self.net(torch.cat([x, x.flip(-1)])).unflatten(0, (2, -1)).mean(0)


def build_classifier(name: str, num_classes: int, in_channels: int, image_size: int, mean: tuple[float, ...],
                     std: tuple[float, ...], width: int | None = None) -> Classifier:
    """A registered network wrapped with the preprocessing of its data."""
    net = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    return Classifier(Preprocess(tuple(mean), tuple(std), in_channels, image_size), net)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in `module` (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _load_builtin_families() -> None:
    # Imported lazily so that importing the registry stays cheap and free of import cycles; fewshot last, as it
    # registers a twin of every architecture registered before it.
    from . import pretrained, small, torchvision_zoo  # noqa: F401
    from . import fewshot  # noqa: F401
