"""What memory the machine has and a run may use: the budget, what is in use now, and the peak a run reached.

A budget caps the process's resident memory (RSS) on the CPU, or the memory it allocates on a GPU. By default it is
half of what is available when the run starts (MemAvailable of /proc/meminfo, or the GPU's free memory) on top of
what the process already holds, so that a run leaves the other half to the rest of the machine.
"""

from __future__ import annotations

import os
import re
import resource

import torch

from ..errors import ConfigError

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    """A size such as 4G, 512M, 1.5G or 800000 (bytes); K/M/G/T are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r}: expected a positive size such as 4G, 512M or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("G", "M", "K"):
        if abs(n) >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}B"
    return f"{n:.0f} B"


def available_bytes(device: torch.device) -> int:
    """Memory free for this process to take: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_use_bytes(device: torch.device) -> int:
    """What the process holds now: memory allocated on the GPU, or its resident set on the host."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss()


def budget(spec: str | None, device: torch.device) -> tuple[int, str]:
    """The run's budget in bytes and where it came from, in words."""
    if spec:
        return parse_bytes(spec), f"--memory-budget {spec}"
    free = available_bytes(device)
    where = "GPU memory free" if device.type == "cuda" else "host memory available"
    return in_use_bytes(device) + free // 2, f"half of the {format_bytes(free)} {where} at start"


def peak_bytes(device: torch.device) -> dict[str, int | None]:
    """The process's peak resident memory so far, and the peak memory allocated on its GPU (None without one)."""
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": _max_rss(), "peak_gpu_bytes": gpu}


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
