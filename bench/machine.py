"""Facts about the machine and the code measured, recorded with every report."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose lib_merge is measured


def has_mecha() -> bool:
    import importlib.util

    return importlib.util.find_spec("sd_mecha") is not None


def mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib_merge"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        files = [ln[3:] for ln in dirty if ln.strip()]
        return head + (f" with uncommitted changes in {', '.join(files)}" if files else " (lib_merge clean)")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    import numpy
    import scipy
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_total() / 2**30, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "load_at_start": os.getloadavg(),
        "git": git_state(),
    }
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except Exception:
        pass
    if has_mecha():
        from importlib.metadata import version

        info["sd_mecha"] = version("sd-mecha")
    if info["cuda"]:
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
