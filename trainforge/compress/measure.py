"""Timing and accuracy of a model variant on each runtime: PyTorch eager, torch.compile and ONNX Runtime.

Latency is measured per call at batch 1 (p50/p99 over many calls), throughput at batch 256 as the median of
repeated timed runs; warm-up calls (allocation, graph planning, compilation) are excluded from both.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..deploy.formats import torch_predictor
from ..hardware.cpuinfo import read_cpuinfo

Predict = Callable[[np.ndarray], np.ndarray]
RUNTIMES = ("eager", "compile", "onnxruntime")


@dataclasses.dataclass
class Timing:
    """How fast one variant ran on one runtime."""

    runtime: str
    latency_ms_p50: float
    latency_ms_p99: float
    throughput: float  # images per second at batch 256


def time_predictor(runtime: str, predict: Predict, sample: np.ndarray, latency_calls: int = 200,
                   throughput_repeats: int = 5, throughput_batch: int = 256) -> Timing:
    """Times `predict` on `sample` (uint8 [N, C, H, W], N >= 1): batch-1 latency and batch-256 throughput."""
    p50, p99 = latency(predict, sample, latency_calls)
    return Timing(runtime, p50, p99, throughput(predict, sample, throughput_batch, throughput_repeats))


def latency(predict: Predict, sample: np.ndarray, calls: int = 200) -> tuple[float, float]:
    """p50 and p99 milliseconds of `predict` on one image of `sample`, after 5 untimed calls."""
    one = np.ascontiguousarray(sample[:1])
    for _ in range(5):
        predict(one)
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        predict(one)
        latencies.append(time.perf_counter() - start)
    lat = np.array(latencies) * 1000.0
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def throughput(predict: Predict, sample: np.ndarray, batch: int = 256, repeats: int = 5) -> float:
    """Images per second of `predict` on batches of `batch` images drawn from `sample` (repeated to fill them):
    the median of `repeats` timed runs after one untimed call."""
    reps = -(-batch // len(sample))
    big = np.ascontiguousarray(np.concatenate([sample] * reps)[:batch])
    predict(big)
    rates = []
    for _ in range(repeats):
        # A repeat lasts at least ~0.2 s so that timer resolution and scheduling noise stay small against it.
        calls, start = 0, time.perf_counter()
        while True:
            predict(big)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= 0.2:
                break
        rates.append(calls * batch / elapsed)
    return float(np.median(rates))


def compiled_predictor(model: nn.Module) -> Predict:
    """torch.compile of `model`; compilation happens on the first calls of each batch size (the warm-up)."""
    return torch_predictor(torch.compile(model))


def accuracy(predict: Predict, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy (0-1) of `predict` over uint8 images."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = predict(np.ascontiguousarray(images[start:start + batch_size]))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(images))


def fastest(timings: list[Timing]) -> Timing:
    return max(timings, key=lambda t: t.throughput)


def cpu_features() -> dict[str, Any]:
    """What the CPU offers for int8 and bf16 arithmetic (from /proc/cpuinfo where it exists)."""
    flags = read_cpuinfo().flags
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_tile" in flags}
