"""Deterministic chunk contents (so another process can check them) and the reliability log."""

import json
import os

import torch

from gds_kvcache import CacheEngineKey, GdsKvCacheError
from gds_kvcache.units import KiB


def chunk_size(i: int) -> int:
    return 4 * KiB * ((i * 37) % 40 + 1) + (i * 131) % 4096 + 1  # never a 4 KiB multiple


def chunk_data(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * (i + 1))
    return torch.randint(0, 256, (chunk_size(i),), dtype=torch.uint8, generator=g)


def rkey(i: int) -> CacheEngineKey:
    return CacheEngineKey("rel", "m", 1, 0, i + 1)


def key_id(k: CacheEngineKey) -> int:
    return int(k.chunk_hash, 16) - 1


def record(name: str, injected: str, trials: int, chunks_checked: int, wrong_bytes: int, lost: int) -> None:
    """Append one row for RELIABILITY.md when GDS_KVCACHE_RELIABILITY_OUT names a file."""
    out = os.environ.get("GDS_KVCACHE_RELIABILITY_OUT")
    if not out:
        return
    with open(out, "a") as f:
        f.write(json.dumps({"test": name, "injected": injected, "trials": trials, "chunks_checked": chunks_checked,
                            "wrong_bytes_served": wrong_bytes, "lost_chunks": lost}) + "\n")


def settle_put(fut) -> None:
    """Wait up to 30 s for a racing put. A refusal (``StorageFullError`` while every chunk is being
    read) is a legal outcome under races; a put that never completes raises the timeout."""
    if fut is None:
        return
    try:
        fut.result(30)
    except GdsKvCacheError:
        pass
