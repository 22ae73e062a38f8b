"""Shared pieces of the benchmark scripts: timing, tables, JSON, device description."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["busy_gpu", "device_name", "time_gpu", "time_gpu_batch", "time_host", "print_table", "write_json", "header"]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def header() -> dict:
    return {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version()}


def time_gpu(fn: Callable[[], None], warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of one ``fn`` call, timed with CUDA events after ``warmup`` runs."""
    return time_gpu_batch(fn, 1, warmup, reps, prefill=False)


def busy_gpu() -> None:
    """Queue about 25 ms of GPU sleep, so host calls made next are queued before the GPU reaches them."""
    sleep = getattr(torch.cuda, "_sleep", None)  # private but long-standing; without it, no prefill
    if sleep is not None:
        sleep(50_000_000)


def time_gpu_batch(fn: Callable[[], None], batch: int = 10, warmup: int = 3, reps: int = 5,
                   prefill: bool = True) -> float:
    """Median seconds per call of ``batch`` back-to-back calls between two CUDA events: device time.

    With ``prefill`` a GPU-side sleep (about 25 ms) is queued before the first
    event, so the host has queued all ``batch`` calls before the GPU reaches
    them and host-side call overhead does not show even where it exceeds the
    kernel's time. Without it, the figure is whichever of host and device is
    slower.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if prefill:
            busy_gpu()
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / batch)
    return statistics.median(times)


def time_host(fn: Callable[[], None], warmup: int = 1, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(rows: Sequence[dict], cols: Sequence[str], title: str = "") -> None:
    if title:
        print(title)
    cells = [[c for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(v.rjust(w) if j else v.ljust(w) for v, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")
