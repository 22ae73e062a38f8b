"""One chunk size of ``bench``: the source chunks, where their files go, and wall-clock timing.

``Case`` is shared by every path ``bench`` measures (the library and the
baselines); ``timed`` is the wall-clock figure of one put or get, synchronising
the GPU around it.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["Case", "timed"]


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev) -> float:
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


class Case:
    """One chunk size: the source chunks and where their files go."""

    def __init__(self, root: str, src: torch.Tensor, size: int, threads: int, task: int, files: int,
                 preallocate: bool, batch: int = 64):
        self.root = root
        self.batch = batch
        self.size = size
        self.src = src  # every chunk, back to back: parts[i] is src[i * size:(i + 1) * size]
        self.n = src.numel() // size
        self.parts = [src[i * size:(i + 1) * size] for i in range(self.n)]
        self.dev = src.device
        self.threads = threads
        self.task = task
        self.files = files
        self.preallocate = preallocate

    def dir(self, name: str) -> str:
        d = os.path.join(self.root, f"{name}-{self.size}")
        os.makedirs(d, exist_ok=True)
        return d

    def same(self, i: int, t: torch.Tensor) -> bool:
        return torch.equal(t.reshape(-1).view(torch.uint8), self.parts[i])
