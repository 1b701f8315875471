"""The machine line every benchmark prints first (imported by the scripts in this folder)."""

from __future__ import annotations

import os
import platform


def describe(device: str = "cpu") -> str:
    """CPU model, logical CPUs, torch threads, Python / torch / lightning versions and the device."""
    import lightning as L
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}, {where}"
    )
