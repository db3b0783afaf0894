"""Wall-clock timing with the device synchronized around each measurement, and where the numbers came from.

Times are host wall clock (``perf_counter``) between two synchronizations: what a caller of the engine waits for,
Python overhead included. Each figure is the median of ``repeats`` runs after a warm-up run (compiles, caches).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch


T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()``'s result and its seconds, between two synchronizations of ``device``."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats)) * 1e3


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> dict:
    """GB/s of one big same-device copy, counting bytes read plus bytes written (the decode roofline's yardstick:
    a memory-bound forward cannot move bytes faster). On the CPU it is memcpy bandwidth."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=max(repeats, 10), warmup=2)
    return {"copy_bytes": src.numel(), "ms": ms, "gb_per_s": 2 * src.numel() / ms / 1e6}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """HEAD of the checkout this package runs from, with ``-dirty`` when the tree has changes."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, check=True,  # noqa: E731
                                           cwd=here, timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, argv: list[str]) -> dict:
    import transformers
    import triton

    return {
        "device": device_name(device),
        "device_type": device.type,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "command_line": "relaykern bench " + " ".join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
