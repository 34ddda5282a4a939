"""FLOPs per sample of a model, counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device.

What is counted: matrix multiplies and convolutions (and attention), forward and backward, 2 FLOPs per
multiply-add, which is how MFU is conventionally defined. Bias additions, normalization, activations, pooling and
trainforge's `Preprocess` (a multiply-add per pixel) are not counted: they are memory-bound, add a fraction of a
percent, and no FLOP/s ceiling describes them. So `linear` on MNIST is exactly 2*784*10 = 15,680 FLOPs per sample
forward, and 31,360 for a training step (the weight gradient is another 2*784*10; the input gradient of the first
layer is never computed because raw images need none).

The count runs on meta tensors: it costs no compute or memory, and it leaves the model untouched (BatchNorm running
statistics, for one, are not updated).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ModelError


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs per sample of one forward pass and of one training step (forward + backward)."""

    forward: int
    train: int

    @property
    def backward(self) -> int:
        return self.train - self.forward


def count_flops(model: nn.Module, example: torch.Tensor) -> FlopCount:
    """FLOPs per sample of `model` on inputs shaped like `example` (a batch [N, ...]); the model is not modified."""
    if example.dim() < 1 or example.shape[0] < 1:
        raise ModelError(f"count_flops needs a batch of at least one example, got shape {tuple(example.shape)}")
    # At least two: training-mode batch norm refuses a single value per channel (a 1x1 map of one image).
    batch = max(2, example.shape[0])
    meta_state = {name: _meta_like(t) for name, t in (*model.named_parameters(), *model.named_buffers())}
    meta_input = torch.empty((batch, *example.shape[1:]), dtype=example.dtype, device="meta")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _counter() as counter:
            functional_call(model, meta_state, (meta_input,))
        forward = counter.get_total_flops()
        model.train()
        with _counter() as counter:
            out = functional_call(model, meta_state, (meta_input,))
            out.float().sum().backward()
        train = counter.get_total_flops()
    except (NotImplementedError, RuntimeError) as exc:
        raise ModelError(f"cannot count the FLOPs of {type(model).__name__} on the meta device ({exc})") from None
    finally:
        model.train(was_training)
    return FlopCount(forward=forward // batch, train=train // batch)


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: its input and its weight gradient each cost what its forward pass does. (torch's
    own formula ignores groups for the weight gradient, which made a depthwise layer cost `groups` times more.)"""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return meta.requires_grad_(t.requires_grad) if t.is_floating_point() else meta
