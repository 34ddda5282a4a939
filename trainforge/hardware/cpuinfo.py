"""The one reader of /proc/cpuinfo: the CPU's name, feature flags and physical cores (empty where it is absent)."""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    physical_cores: int | None  # None where /proc/cpuinfo does not say


@functools.lru_cache(maxsize=1)
def read_cpuinfo(path: str = "/proc/cpuinfo") -> CpuInfo:
    """What `path` says about the CPU; the name falls back to what the platform module knows."""
    model, flags, pairs, physical = "", set(), set(), "0"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
                elif key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    pairs.add((physical, value.strip()))
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or platform.machine(), frozenset(flags), len(pairs) or None)



@functools.lru_cache(maxsize=1)
def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of the CPU's largest data cache, from sysfs (None where it does not say)."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    sizes = []
    for entry in sorted(Path(root).glob("index*")):
        try:
            kind, size = (entry / "type").read_text().strip(), (entry / "size").read_text().strip()
        except OSError:
            continue
        if kind in ("Data", "Unified") and size[:-1].isdigit() and size[-1] in units:
            sizes.append(int(size[:-1]) * units[size[-1]])
    return max(sizes, default=None)
