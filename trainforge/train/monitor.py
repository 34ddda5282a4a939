"""Live monitoring of a training run: throughput, MFU, memory and, on NVIDIA GPUs, utilization and power.

`train()` makes one `Monitor` and merges `epoch_stats()` into each epoch's record, so the figures land in the progress
bar, `metrics.jsonl` and TensorBoard beside the loss. Nothing here runs in the hot loop: the FLOPs per sample are
counted once before training (on the meta device), the memory figures are allocator counters (no device sync), and
NVML is polled by a background thread every `NVML_INTERVAL_S` seconds.

Fields added to each record:
  train_samples_per_second  samples/s of the training steps alone (the record's samples_per_second includes evaluation)
  flops_per_second          achieved FLOP/s of those steps: FLOPs per training sample (forward + backward) x samples/s
  mfu                       flops_per_second / (measured matmul ceiling of the device at this precision x processes),
                            null until `trainforge hw --measure` (or `trainforge bench`) has cached the ceiling
  memory_mb, max_memory_mb  memory in use now and at its peak so far: the CUDA caching allocator's allocated bytes on
                            a GPU, the process's resident set on the CPU (MPS: allocated now, no peak)
  gpu_util_percent, gpu_power_watts, gpu_power_max_watts
                            means (and the maximum power) of the NVML samples taken during the epoch; only on CUDA
                            with the nvidia-ml-py package installed
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch
from torch import nn

from ..hardware.ceilings import lookup_ceiling
from ..hardware.flops import count_flops
from ..errors import ModelError

NVML_INTERVAL_S = 1.0


class Monitor:
    """Per-epoch performance figures for one training process; `close()` stops its NVML sampler."""

    def __init__(self, model: nn.Module, example: torch.Tensor, device: torch.device, precision: str,
                 world_size: int = 1, sample_gpu: bool = True):
        """`model` is the bare model (before DDP/FSDP/compile wrapping), `example` a batch of its raw input."""
        self.device = device
        self.world_size = world_size
        try:
            self.flops_per_sample: int | None = count_flops(model, example[:1]).train
        except ModelError:
            # A model the meta device cannot run still trains; it just has no MFU.
            self.flops_per_sample = None
        self.ceiling = lookup_ceiling(device, precision)
        self.sampler = _NvmlSampler(device) if sample_gpu and device.type == "cuda" else None

    def start(self) -> None:
        """Starts GPU sampling (if any); call right before the first step."""
        if self.sampler is not None:
            self.sampler.start()

    def epoch_stats(self, samples: int, train_seconds: float) -> dict[str, Any]:
        """Figures for an epoch whose training steps processed `samples` samples (all processes) in `train_seconds`."""
        rate = samples / train_seconds if train_seconds > 0 else 0.0
        achieved = self.flops_per_sample * rate if self.flops_per_sample is not None else None
        stats: dict[str, Any] = {
            "train_samples_per_second": rate,
            "flops_per_second": achieved,
            "mfu": achieved / (self.ceiling * self.world_size) if achieved is not None and self.ceiling else None,
        }
        stats.update(memory_stats(self.device))
        if self.sampler is not None:
            stats.update(self.sampler.drain())
        return stats

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Memory in use and its peak so far, in MiB, read from counters (no device synchronization)."""
    if device.type == "cuda":
        return {"memory_mb": torch.cuda.memory_allocated(device) / 2 ** 20,
                "max_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    if device.type == "mps":
        return {"memory_mb": torch.mps.current_allocated_memory() / 2 ** 20, "max_memory_mb": None}
    try:
        import resource  # POSIX only
    except ImportError:
        return {"memory_mb": _resident_mib(), "max_memory_mb": None}
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    return {"memory_mb": _resident_mib(), "max_memory_mb": peak}


def _resident_mib() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _NvmlSampler:
    """Polls one GPU's utilization and power through NVML on a daemon thread; silent where NVML is absent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.nvml: Any = None
        self.handle: Any = None

    def start(self) -> None:
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.handle = _nvml_handle(pynvml, self.device)
        except pynvml.NVMLError:
            return
        self.nvml = pynvml
        self.thread = threading.Thread(target=self._poll, name="trainforge-nvml", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(NVML_INTERVAL_S):
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                watts = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            except self.nvml.NVMLError:
                # Some GPUs (MIG slices, some laptops) do not report these; stop asking.
                return
            with self.lock:
                self.samples.append((float(util), watts))

    def drain(self) -> dict[str, float | None]:
        """Means (and peak power) of the samples taken since the last call; None where there were none."""
        with self.lock:
            samples, self.samples = self.samples, []
        if not samples:
            return {"gpu_util_percent": None, "gpu_power_watts": None, "gpu_power_max_watts": None}
        return {"gpu_util_percent": sum(u for u, _ in samples) / len(samples),
                "gpu_power_watts": sum(w for _, w in samples) / len(samples),
                "gpu_power_max_watts": max(w for _, w in samples)}

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
            self.nvml = None


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, matched by UUID: CUDA_VISIBLE_DEVICES renumbers torch's devices but
    not NVML's."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)
