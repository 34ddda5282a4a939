"""How a model runs fastest on a device: its memory layout and numeric precision, chosen once per (model family,
device) by rules that the benchmarks back (benchmarks/RESULTS.md, "Fine-tuning speed"), and recorded in the run's
config so that a re-run takes the same choices.

The rules follow what was measured on a 2-core AVX-512-BF16 CPU (oneDNN) for a training step:
- channels-last: faster for every convolutional family measured (the small CNNs 1.3-1.8x, EfficientNet-Lite0 1.6x,
  ResNet-18 too), and the layout NVIDIA tensor cores want; Apple's MPS backend is left as it is.
- bf16 on the CPU: faster for dense convolutions (the small CNNs 1.3-1.6x) but several times slower for depthwise
  ones, whose bf16 kernels fall back to a slow path, so a CPU with native bf16 (AVX512-BF16 or AMX) gets it only
  for models without depthwise convolutions. Inference in bf16 was faster for all of them (EfficientNet-Lite0 1.6x),
  so evaluation may take bf16 where training does not (`eval_precision`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..hardware.cpuinfo import read_cpuinfo
from .device import resolve_precision

LAYOUTS = ("auto", "channels-last", "contiguous")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def is_convolutional(model: nn.Module) -> bool:
    """Whether `model` has a 2-D convolution, the layers whose speed depends on the layout."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def has_depthwise(model: nn.Module) -> bool:
    """Whether `model` has a grouped (depthwise or group) convolution."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX), where bf16 can beat fp32."""
    return any(flag in read_cpuinfo().flags for flag in NATIVE_BF16_FLAGS)


def choose_layout(requested: str, model: nn.Module, device: torch.device, sharded: bool = False) -> str:
    """'channels-last' or 'contiguous': the requested one, or for 'auto' the one measured faster; contiguous for a
    model FSDP shards (`sharded`), which takes only contiguous parameters."""
    if sharded and requested == "channels-last" and is_convolutional(model):
        raise ConfigError("--layout channels-last: FSDP (--parallel fsdp) shards only contiguous parameters; pass "
                          "--layout contiguous (or auto), or --parallel ddp")
    if requested != "auto":
        return requested
    fast_here = device.type in ("cpu", "cuda") and not sharded
    return "channels-last" if fast_here and is_convolutional(model) else "contiguous"


def choose_precision(requested: str | None, model: nn.Module, device: torch.device) -> str:
    """'32', 'bf16' or 'fp16': the requested one (checked against the device), or for 'auto' (and None) the fastest
    this device runs `model` in without fp16's loss scaling."""
    requested = requested or "auto"
    if requested == "auto" and device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() and not has_depthwise(model) else "32"
    return resolve_precision(requested, device)


def choose_eval_precision(requested: str | None, precision: str, device: torch.device) -> str:
    """The precision of evaluation: the training `precision` for None, else as `requested`, where 'auto' is bf16 on
    a CPU with native bf16 (inference in bf16 ran faster there even for depthwise convolutions, whose bf16 training
    does not) and what training's 'auto' is elsewhere."""
    if requested is None:
        return precision
    if requested == "auto" and device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "32"
    return resolve_precision(requested, device)


def apply_layout(model: nn.Module, layout: str) -> nn.Module:
    """`model` with its 4-D weights in `layout`, in place (convolutions then run in that layout)."""
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    return model.to(memory_format=fmt)
