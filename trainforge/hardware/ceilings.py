"""The per-machine record of `trainforge hw --measure`: where it lives and which ceiling applies to a workload.

The file is `$TRAINFORGE_CACHE/hw-<host>-<hash>.json` (default directory `~/.cache/trainforge`); the hash covers the
CPU model, the GPU names and the torch version, because any of them changes the ceilings.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..errors import CheckpointError, ConfigError
from .cpuinfo import read_cpuinfo

FORMAT = 1


def cache_dir() -> Path:
    """`$TRAINFORGE_CACHE`, else `~/.cache/trainforge`."""
    return Path(os.environ.get("TRAINFORGE_CACHE") or Path.home() / ".cache" / "trainforge")


def gpu_names() -> list[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_key() -> str:
    """`<host>-<hash>`: stable for one machine and software stack, different when the hardware or torch changes."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
    # The distinct GPU models, not the visible list: a job that sees a subset of identical GPUs (CUDA_VISIBLE_DEVICES)
    # is still on the measured machine.
    facts = json.dumps([read_cpuinfo().model, os.cpu_count(), sorted(set(gpu_names())), torch.__version__])
    return f"{host}-{hashlib.sha256(facts.encode()).hexdigest()[:12]}"


def cache_path() -> Path:
    return cache_dir() / f"hw-{machine_key()}.json"


def read_cache(path: Path | None = None) -> dict[str, Any] | None:
    """The cached measurement of this machine, or None when there is none (or it is unreadable or outdated)."""
    path = path or cache_path()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("ceilings"), dict):
        return None
    return record


def write_cache(record: dict[str, Any], path: Path | None = None) -> Path:
    """Writes the record atomically (a concurrent reader sees the old file or the new one, never half of one)."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        runs.write_text(path, json.dumps({**record, "format": FORMAT}, indent=1))
    except (OSError, CheckpointError) as exc:
        raise ConfigError(f"cannot write the hardware cache {path} ({exc}); set TRAINFORGE_CACHE to a writable "
                          f"directory") from None
    return path


def device_key(device: torch.device) -> str:
    """'cpu', 'cuda:0', 'mps': the name a device's ceilings are stored under."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def matmul_dtype(device: torch.device, precision: str) -> str:
    """The matmul ceiling a training precision runs against: fp32 work on a CUDA GPU runs as TF32 in trainforge."""
    if precision == "bf16":
        return "bf16"
    if precision == "fp16":
        return "fp16"
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def lookup_ceiling(device: torch.device, precision: str, record: dict[str, Any] | None = None) -> float | None:
    """Measured matmul FLOP/s of `device` at `precision` from the cache, or None if it was never measured."""
    record = record if record is not None else read_cache()
    if record is None:
        return None
    value = record["ceilings"].get(device_key(device), {}).get("matmul_flops", {}).get(matmul_dtype(device, precision))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None
