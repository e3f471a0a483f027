"""Shared by the benchmark scripts: the CPU's name for the machine line of a report."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """/proc/cpuinfo's model name (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
