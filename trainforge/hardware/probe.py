"""The hardware probe: what devices this machine has, and micro-benchmarks of their ceilings (matmul FLOP/s per
dtype, memory and host<->device bandwidth), for `hw`, `bench`, `report` and training's live MFU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import socket
import time
from typing import Any, Callable, Iterator

import torch

from ..train.device import synchronize
from . import ceilings
from .cpuinfo import read_cpuinfo

# Matrix sides of the matmul ceiling: big enough that the kernel, not the call overhead, sets the rate (a 1024 fp32
# matmul is 2 GFLOP, ~50 ms on two CPU cores; an 8192 one is 1.1 TFLOP, ~1 ms in bf16 on an H100-class GPU).
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192, "mps": 4096}
# A dtype without a fast path (bf16 on a CPU without AVX512-BF16: ~1 GFLOP/s, 2 s per 1024 matmul) is measured on
# the largest side, down to this one, whose call fits one timed block: the full side took 15 s of `hw --measure`.
MIN_MATMUL_SIZE = 128
# Bytes of each side of the bandwidth copies: far beyond any cache, yet a small share of device memory.
COPY_BYTES = {"cpu": 256 * 2 ** 20, "cuda": 2 ** 30, "mps": 256 * 2 ** 20}
HOST_COPY_BYTES = 256 * 2 ** 20
# Each figure is the best of a few timed blocks: a neighbour or a stall can only slow a block, never speed it up, so
# the fastest block is the closest to what the device can do (a median carried the load of a shared machine into
# the ceiling, and MFUs above 100% out of it).
BLOCKS = 5
SECONDS_PER_FIGURE = 0.5
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve")


def inspect() -> dict[str, Any]:
    """Facts about the CPU, the CUDA GPUs (None without CUDA) and Apple MPS (None where absent); measures nothing."""
    return {"host": socket.gethostname(), "machine_key": ceilings.machine_key(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_info(), "cuda": cuda_info(), "mps": mps_info()}


def cpu_info() -> dict[str, Any]:
    """Model, logical/physical/usable cores, ISA level and flags, and torch's CPU kernels and thread counts."""
    info = read_cpuinfo()
    flags, cores = info.flags, info.physical_cores
    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {
        "model": info.model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": cores or os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": isa_level(flags),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "torch_cpu_capability": capability() if capability else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def isa_level(flags: frozenset[str] | set[str]) -> str:
    """The widest vector/matrix extension the CPU reports: AMX > AVX-512 > AVX2 > AVX (x86), SVE > NEON (Arm)."""
    for flag, level in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                        ("sve", "SVE"), ("asimd", "NEON")):
        if flag in flags:
            return level
    return "baseline"


def cuda_info() -> dict[str, Any] | None:
    """Driver and library versions, each GPU's properties and the peer-access matrix; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    devices = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        # bf16 and TF32 tensor cores arrived with Ampere (compute capability 8.0).
        ampere = props.major >= 8
        devices.append({"index": i, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                        "memory_gib": props.total_memory / 2 ** 30, "sm_count": props.multi_processor_count,
                        "bf16": ampere, "tf32": ampere,
                        "uuid": str(props.uuid) if hasattr(props, "uuid") else None})
    nccl = None
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return {"driver": _nvml_driver_version(), "runtime": torch.version.cuda, "cudnn": cudnn, "nccl": nccl,
            "devices": devices,
            "p2p": [[None if i == j else torch.cuda.can_device_access_peer(i, j) for j in range(count)]
                    for i in range(count)],
            "multi_process_service": os.path.exists(os.path.join(pipe_dir, "control"))}


def _nvml_driver_version() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else version


def mps_info() -> dict[str, Any] | None:
    """Apple's Metal device, when torch can use it; None elsewhere."""
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        return None
    return {"available": True, "platform": platform.platform()}


def devices_present() -> list[torch.device]:
    """The CPU, then every CUDA GPU, then Apple MPS if present."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if mps_info() is not None:
        found.append(torch.device("mps"))
    return found


def matmul_dtypes(device: torch.device) -> list[str]:
    """The dtypes whose matmul ceiling means something on `device` (trainforge has no fp16 on the CPU)."""
    if device.type == "cuda":
        return ["fp32", "tf32", "bf16", "fp16"]
    if device.type == "mps":
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"]


def measure_all(progress: bool = False, seconds: float = SECONDS_PER_FIGURE) -> dict[str, dict[str, Any]]:
    """Ceilings of every device present, keyed like `ceilings.device_key` ('cpu', 'cuda:0', ...)."""
    from rich.console import Console

    status = Console(stderr=True).status("measuring") if progress else None
    if status:
        status.start()
    try:
        results = {}
        for device in devices_present():
            if status:
                status.update(f"measuring {ceilings.device_key(device)}")
            results[ceilings.device_key(device)] = measure_device(device, seconds)
        return results
    finally:
        if status:
            status.stop()


def measure_device(device: torch.device, seconds: float = SECONDS_PER_FIGURE) -> dict[str, Any]:
    """Matmul FLOP/s per dtype, on-device copy bandwidth and (CUDA) host<->device bandwidth of one device."""
    sizes = {dtype: matmul_size(device, dtype, seconds) for dtype in matmul_dtypes(device)}
    result: dict[str, Any] = {
        "matmul_size": sizes,
        "matmul_flops": {dtype: _matmul_or_none(device, dtype, n, seconds) for dtype, n in sizes.items()},
        "memory_bandwidth": measure_copy_bandwidth(device, seconds=seconds),
    }
    if device.type == "cuda":
        result["host_to_device"] = {kind: measure_host_bandwidth(device, "h2d", kind == "pinned", seconds)
                                    for kind in ("pinned", "pageable")}
        result["device_to_host"] = {kind: measure_host_bandwidth(device, "d2h", kind == "pinned", seconds)
                                    for kind in ("pinned", "pageable")}
    return result


def _matmul_or_none(device: torch.device, dtype: str, size: int | None, seconds: float) -> float | None:
    try:
        return None if size is None else measure_matmul(device, dtype, size, seconds)
    except RuntimeError:
        # Older backends lack some dtypes (bf16 on MPS before macOS 14): no ceiling rather than no report.
        return None


def matmul_size(device: torch.device, dtype: str, seconds: float = SECONDS_PER_FIGURE) -> int | None:
    """The side measure_matmul uses for `dtype`: MATMUL_SIZE, or the largest power-of-two fraction of it whose call
    fits one timed block. Sides grow from MIN_MATMUL_SIZE while the next one's call, at most 8x this one's, fits (a
    small call's rate is never above a large one's); None where `dtype` does not run on `device`."""
    n = MIN_MATMUL_SIZE
    try:
        with _tf32(dtype):
            while n < MATMUL_SIZE[device.type] and 8 * _call_seconds(_matmul_call(device, dtype, n), device) <= \
                    seconds / BLOCKS:
                n *= 2
    except RuntimeError:
        return None
    return n


def measure_matmul(device: torch.device, dtype: str, size: int | None = None,
                   seconds: float = SECONDS_PER_FIGURE) -> float:
    """FLOP/s of a square `size` matmul (2*size^3 FLOPs) in `dtype` (fp32, tf32, bf16, fp16)."""
    n = size or MATMUL_SIZE[device.type]
    with _tf32(dtype):
        return 2.0 * n ** 3 * _best_rate(_matmul_call(device, dtype, n), device, seconds)


def _matmul_call(device: torch.device, dtype: str, n: int) -> Callable[[], Any]:
    """One `n`-sided matmul in `dtype`, into a preallocated output."""
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    out = torch.empty(n, n, device=device, dtype=torch_dtype)
    return lambda: torch.matmul(a, b, out=out)


@contextlib.contextmanager
def _tf32(dtype: str) -> Iterator[None]:
    """TF32 matmuls allowed only while measuring 'tf32', set once around the timed calls rather than in them."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of `fn` after a warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return max(time.perf_counter() - start, 1e-7)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None,
                           seconds: float = SECONDS_PER_FIGURE) -> float:
    """Bytes/s of a large on-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or COPY_BYTES[device.type]
    if device.type == "cuda":
        nbytes = min(nbytes, torch.cuda.get_device_properties(device).total_memory // 8)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 * _best_rate(lambda: dst.copy_(src), device, seconds)


def measure_host_bandwidth(device: torch.device, direction: str, pinned: bool,
                           seconds: float = SECONDS_PER_FIGURE) -> float:
    """Bytes/s of host->device ('h2d') or device->host ('d2h') copies from pinned or pageable host memory."""
    host = torch.ones(HOST_COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(HOST_COPY_BYTES, dtype=torch.uint8, device=device)
    copy = (lambda: dev.copy_(host, non_blocking=pinned)) if direction == "h2d" else \
        (lambda: host.copy_(dev, non_blocking=pinned))
    return HOST_COPY_BYTES * _best_rate(copy, device, seconds)


def _best_rate(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Calls of `fn` per second in the fastest of BLOCKS timed blocks, after a warm-up call."""
    one = _call_seconds(fn, device)
    reps = max(1, int(seconds / BLOCKS / one))
    per_call = []
    for _ in range(BLOCKS):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / reps)
    return 1.0 / min(per_call)


def timestamp() -> str:
    """Now, in UTC, as ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
