"""The machine a result was measured on, as reports and the benchmark record it: CPU model, cores, memory,
torch version, GPU or none. Read from the system, never typed in."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip() or platform.machine()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _memory_gib() -> float | None:
    """Physical memory in GiB, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    """{cpu, arch, cores, memory_gib, torch, gpu}: gpu is the CUDA device's name, or None."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    memory = _memory_gib()
    return {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "memory_gib": None if memory is None else round(memory, 1), "torch": torch.__version__, "gpu": gpu}


def describe(m: dict) -> str:
    """One line: 'AMD EPYC (x86_64), 2 cores, 23.5 GiB, torch 2.14.1, no GPU'."""
    memory = f"{m['memory_gib']:.1f} GiB" if m.get("memory_gib") is not None else "memory unknown"
    return (f"{m['cpu']} ({m['arch']}), {m['cores']} cores, {memory}, torch {m['torch']}, "
            f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}")
