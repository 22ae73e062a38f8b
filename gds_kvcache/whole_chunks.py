"""Whole-chunk batches between a paged cache and the storage tiers: the core of ``store`` and ``retrieve``.

A whole chunk is one object ``[K, L, T, row]`` holding every layer of ``T``
tokens. Chunks move in batches of up to a quarter of the slab (one batched
allocation or read each, few large transfers), so a prompt larger than the
slab still moves whole, each batch waiting for (store) or reusing (retrieve)
the room the last one freed.

Invariants: a stored batch's objects stay referenced until the packs that
wrote them have run (``stream_pins``: a put may drop an object at once); a
retrieved batch's objects are released only after its copies ran (the
stream is synchronised), since another thread may reuse the extent at once;
no byte of an object of the wrong shape or dtype reaches the paged cache.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future

import torch

from .kernels import pack, unpack
from .memory.format import MemoryFormat
from .stream_pins import StreamPins

__all__ = ["WholeChunks"]

log = logging.getLogger(__name__)


class WholeChunks:
    """Stores and loads whole chunks of one model geometry (``kv`` halves, ``layers``, ``row`` elements)."""

    def __init__(self, storage, layout: str, fmt: MemoryFormat, dtype: torch.dtype, kv: int, layers: int,
                 row: int):
        self.storage = storage
        self.layout = layout
        self.fmt = fmt
        self.dtype = dtype
        self._dims = (kv, layers, row)

    def shape(self, tokens: int) -> tuple:
        kv, layers, row = self._dims
        return (kv, layers, tokens, row)

    def groups(self, chunks):
        """``chunks`` ((key, start, end) triples) cut into batches of at most a quarter of the slab."""
        budget = max(1, getattr(self.storage.allocator, "capacity", 1 << 62) // 4)
        group, size = [], 0
        for c in chunks:
            n = math.prod(self.shape(c[2] - c[1])) * self.dtype.itemsize
            if group and size + n > budget:
                yield group
                group, size = [], 0
            group.append(c)
            size += n
        if group:
            yield group

    def store(self, todo, kv_caches, slots, pins: StreamPins) -> tuple[int, list, bool]:
        """Pack ``todo`` ((key, start, end) triples) on the current stream and put them, in batches.

        Returns the tokens stored, the disk puts' futures and whether every
        chunk found room (when one did not, the rest is not stored). ``pins``
        keeps each batch's objects until its packs have run.
        """
        futures: list[Future] = []
        stored = 0
        total = sum(e - s for _, s, e in todo)
        for group in self.groups(todo):
            pins.release_done()
            objs = self.storage.batched_allocate([self.shape(e - s) for _, s, e in group], self.dtype, fmt=self.fmt)
            try:
                for obj, (_, s, e) in zip(objs, group):
                    pack(kv_caches, self.layout, slots[s:e], obj.tensor, check=False)
            except BaseException:
                if objs:     # packs already queued may still write them
                    pins.hold(objs, objs[0].device)
                for obj in objs:
                    obj.ref_count_down()
                raise
            done = group[: len(objs)]
            if objs:
                pins.hold(objs, objs[0].device)
            futs = [f for f in self.storage.batched_submit_put_task([k for k, _, _ in done], objs) if f is not None]
            for f in futs:      # a disk write waits for the packs first: the pins can go once one is done
                f.add_done_callback(lambda _, pins=pins: pins.release_done())
            futures.extend(futs)
            stored += sum(e - s for _, s, e in done)
            if len(done) < len(group):
                log.warning("no slab room to store the rest of this prompt; stored %d of %d tokens", stored, total)
                return stored, futures, False
        pins.release_done()
        return stored, futures, True

    def retrieve(self, keys, kv_caches, slots, valid: int) -> tuple[int, bool]:
        """Read one batch (``keys``: (key, start, end) triples) and unpack it on the current stream,
        writing no token at or after ``valid``; (tokens loaded up to, whether every chunk of it loaded)."""
        held = self.storage.batched_get_blocking([k for k, _, _ in keys])
        loaded, ok = 0, True
        try:
            for obj, (key, s, e) in zip(held, keys):
                if obj is None:
                    ok = False
                    break
                if tuple(obj.shape) != self.shape(e - s) or obj.dtype != self.dtype:
                    log.warning("chunk %s holds %s %s, not this model's; stopping", key.to_string(),
                                tuple(obj.shape), obj.dtype)
                    ok = False
                    break
                chunk_slots = slots[s:e]
                if e > valid:
                    # The chunk holding the first slotless token: keep its
                    # valid rows, write none after (device-side, no sync).
                    chunk_slots = chunk_slots.clone()
                    chunk_slots[valid - s:] = -1
                unpack(obj.tensor, kv_caches, self.layout, chunk_slots, check=False)
                loaded = min(e, valid)
        finally:
            live = [o for o in held if o is not None]
            if live and live[0].device.type == "cuda":
                # The slab extent may be reused (even by a DMA from another
                # thread) as soon as it is released: the copies must be done.
                torch.cuda.current_stream(live[0].device).synchronize()
            for obj in live:
                obj.ref_count_down()
        return loaded, ok
