"""The machine line every benchmark prints beside its numbers."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (or what platform knows)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    return f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average unknown"
