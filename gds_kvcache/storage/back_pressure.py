"""Slab room for the storage manager: the store side waits, the read side only when it asks to.

``allocate_waiting`` is a store's allocation: when the slab is full it first
drops hot-tier chunks nobody holds, then waits for disk writes in flight to
finish (each frees the slab room its chunks held), at most ``wait_s``
seconds in all; a batch that can never fit is cut to its longest prefix that
can. ``room_for_reads`` only drops unheld hot-tier chunks before a disk read.
``wait_for_read_room`` is for a reader that would rather wait than miss (a
layer-wise load, whose count the caller has planned a forward on): it drops
unheld hot-tier chunks and otherwise waits, briefly, for room to come back.
Invariants: the allocator itself is never asked to wait; a read never waits
for room (a chunk that finds none is a miss) unless its caller asks to; a
store returns a prefix of what it asked for, never a gap; no lock is held
while waiting.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch

from ..key import CacheEngineKey
from ..memory.allocator import MemoryAllocatorInterface, allocate_batch
from ..memory.format import MemoryFormat
from ..memory.obj import MemoryObj
from ..units import PAGE, align_up
from .abstract_backend import StorageBackendInterface

__all__ = ["allocate_waiting", "room_for_reads", "wait_for_read_room"]


def allocate_waiting(allocator: MemoryAllocatorInterface, hot: Optional[StorageBackendInterface],
                     disk: Optional[StorageBackendInterface], shapes: list, dtype: torch.dtype,
                     fmt: MemoryFormat, eviction: bool, wait_s: float) -> list[MemoryObj]:
    """Slab objects for ``shapes`` (checked, non-empty), adjacent where possible.

    Returns all of them, or as many as fit once ``hot``'s unheld chunks were
    dropped and ``disk``'s writes waited for (at most ``wait_s``); an empty
    list when none fits. ``eviction`` False: one attempt, no dropping or waiting.
    """
    dtypes, fmts = [dtype] * len(shapes), [fmt] * len(shapes)
    need = sum(align_up(max(1, math.prod(s) * dtype.itemsize), PAGE) for s in shapes)
    deadline = time.monotonic() + wait_s
    while True:
        objs = allocate_batch(allocator, shapes, dtypes, fmts)
        if len(objs) == len(shapes) or not eviction:
            return objs
        for o in objs:
            o.ref_count_down()
        cap = allocator.capacity
        if need > cap:
            # The whole batch can never fit: aim for the longest prefix that can.
            sizes = [align_up(max(1, math.prod(s) * dtype.itemsize), PAGE) for s in shapes]
            k, need = 0, 0
            while k < len(sizes) and need + sizes[k] <= cap:
                need += sizes[k]
                k += 1
            if k == 0:
                return []
            shapes, dtypes, fmts = shapes[:k], dtypes[:k], fmts[:k]
            continue
        if hot is not None and hot.evict_unused(need) > 0:
            continue
        left = deadline - time.monotonic()
        if left <= 0 or disk is None or not disk.wait_for_put_progress(left):
            return allocate_batch(allocator, shapes, dtypes, fmts)


def room_for_reads(allocator: MemoryAllocatorInterface, hot: Optional[StorageBackendInterface],
                   disk: Optional[StorageBackendInterface], keys: Sequence[CacheEngineKey]) -> None:
    """Drop unheld hot-tier chunks so the disk reads of ``keys`` find slab room (never waits)."""
    if hot is None or disk is None:
        return
    need = sum(disk.entry_size(k) for k in keys)
    free = allocator.free_bytes
    if need > free:
        hot.evict_unused(need - free)


def wait_for_read_room(allocator: MemoryAllocatorInterface, hot: Optional[StorageBackendInterface],
                       disk: Optional[StorageBackendInterface], keys: Sequence[CacheEngineKey],
                       timeout: float) -> None:
    """Give the disk reads of ``keys`` a chance of slab room, taking at most ``timeout`` seconds.

    Drops unheld hot-tier chunks when the free bytes fall short (and returns at
    once if that covered it); else waits for a disk write in flight to finish
    (it frees the room it held), or, with none in flight, for ``timeout``
    (room held by other readers comes back when they release it).
    """
    start = time.monotonic()
    if disk is not None:
        need = sum(disk.entry_size(k) for k in keys)
        short = need - allocator.free_bytes
        if short > 0 and hot is not None and hot.evict_unused(short) >= short:
            return
        if disk.wait_for_put_progress(timeout):
            return
    left = timeout - (time.monotonic() - start)
    if left > 0:
        time.sleep(left)
