"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, label) as p: p.update(n)`` draws ``[####....] 40% label`` on a TTY or
    prints a line every few seconds elsewhere (CI logs)."""

    def __init__(self, total: int, label: str, stream=None):
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty or now - self.last >= 5 or self.done >= self.total:
            self.last = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            end = "\r" if self.tty and frac < 1 else "\n"
            self.stream.write(f"[{bar}] {100 * frac:3.0f}% {self.label} ({now - self.t0:.0f} s){end}")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.done < self.total and self.tty:
            self.stream.write("\n")
