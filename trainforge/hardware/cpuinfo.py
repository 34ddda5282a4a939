"""The one reader of /proc/cpuinfo: the CPU's name, feature flags and physical cores (empty where it is absent)."""

from __future__ import annotations

import dataclasses
import functools
import platform


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
