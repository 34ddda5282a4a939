"""Choosing the device and numeric precision, and the per-device switches that make them fast."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error, not a fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: expected auto, cpu, cuda, cuda:N or mps; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device: expected auto, cpu, cuda, cuda:N or mps; got {name!r}")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 where the GPU supports it, fp32 elsewhere (CPU autocast is slower than fp32 for small nets)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; use bf16 or 32 on the CPU")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls and cudnn autotuning: free speed on NVIDIA GPUs for fp32 work."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def configure_host_allocator() -> None:
    """Keeps freed batch-sized buffers in glibc's heap instead of returning them to the OS.

    With glibc's defaults every multi-megabyte temporary is a fresh mmap whose pages fault in on first touch; on the
    machines measured here that made an elementwise op on a 1024x784 batch 25x slower than the op itself. A raised
    mmap threshold cannot help past its 32 MB ceiling (a cnn's activations at 64 px and batch 128 are 67 MB), so
    mmap is switched off: every block comes from the heap and is reused (benchmarks/RESULTS.md, "Photo folders").
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 30)
    libc.mallopt(m_top_pad, 64 * 2 ** 20)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
