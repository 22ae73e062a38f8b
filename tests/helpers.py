"""Shared test helpers."""

import threading

import numpy as np
import torch

def random_tensor(shape, dtype, device="cpu", gen=None):
    """Random bits of ``dtype`` (never zeros): every byte pattern, NaNs included, is fair game."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (max(n, 1),), dtype=torch.uint8, generator=gen)[:n]
    return raw.view(dtype).reshape(shape).to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu())


def run_threads(worker, n: int, timeout: float = 120.0) -> list:
    """Run ``worker(i)`` for ``i < n`` on ``n`` threads and join each for up to ``timeout`` s;
    returns the threads, so the caller can assert none is still alive."""
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    return ts
