"""``StreamPins``: references on slab objects kept until the GPU work queued before a point has run.

A store packs KV into slab objects with kernels queued on a CUDA stream and
hands the objects to ``StorageManager.batched_submit_put_task`` at once,
without waiting for the kernels. The put consumes the caller's reference: an
object whose key turns out to be stored already (or that another tier drops
early) goes back to the allocator inside the put, while its pack is still
queued. The extent can then be handed to a concurrent disk read and be
overwritten by the stale pack after that read was verified: wrong bytes.

Invariant: every object handed to a put after a pack holds one extra
reference from before the put until the work queued on the packing stream up
to the put has run (its event completed; on the host, where kernels run on
return, until the put returned). Pins are released in the order taken.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Optional, Sequence

import torch

from .memory.obj import MemoryObj

__all__ = ["StreamPins"]


class StreamPins:
    """Objects pinned until an event on the stream that wrote them completes (see the module docstring)."""

    def __init__(self) -> None:
        self._held: deque = deque()
        self._lock = threading.Lock()

    def hold(self, objs: Sequence[MemoryObj], device: torch.device) -> None:
        """Take a reference on each of ``objs`` until the work queued so far on ``device``'s current
        stream (of the calling thread) has run. Call before handing them to a put."""
        ev: Optional[torch.cuda.Event] = None
        if device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
        objs = list(objs)
        for o in objs:
            o.ref_count_up()
        with self._lock:
            self._held.append((ev, objs))

    def release_done(self) -> None:
        """Drop the pins whose work has run; never waits."""
        self._release(wait=False)

    def release_all(self) -> None:
        """Wait for every pinned object's work, then drop every pin."""
        self._release(wait=True)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(objs) for _, objs in self._held)

    def _release(self, wait: bool) -> None:
        while True:
            with self._lock:
                if not self._held:
                    return
                ev, objs = self._held[0]
                if ev is not None and not wait and not ev.query():
                    return
                self._held.popleft()
            if ev is not None and wait:
                ev.synchronize()
            for o in objs:
                o.ref_count_down()
