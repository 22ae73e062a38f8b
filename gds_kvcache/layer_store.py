"""The store side of layer-wise operations: ``CacheEngine.store_layer``'s thread and generator.

Each step hands over one layer the caller has finished (an event on its
stream); a thread packs it into slab objects on a stream of its own and,
for per-layer objects, starts its disk writes (only of the layer objects a
chunk misses). Invariants: the last layer's objects (or the whole chunks) go
to storage only at the last step, so a generator abandoned before it leaves
no chunk that counts as stored (see ``gds_kvcache.layerwise`` for the format
and the shared guarantees); an object handed to a put stays referenced until
the pack that wrote it has run (``stream_pins``: the put may drop it at once).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .layer_moves import move_layer
from .layerwise import LayerOp, layer_key

__all__ = ["LayerStore", "store_steps"]

log = logging.getLogger(__name__)


class LayerStore(LayerOp):
    """One ``store_layer`` call: the layers handed over so far and the thread that packs and puts them."""

    def __init__(self, engine, toks, kv_caches, slots, valid):
        super().__init__(engine, kv_caches, slots, valid, "gds-kvcache-layer-store")
        self.chunks = [c for c in engine._keys(toks) if c[2] <= valid]
        self.handed: list = []
        self.rest: list = []        # whole chunks beyond the first batch: stored at the last step
        self.final = False
        self.stored = 0
        self.futures: list = []
        self.done_event = None

    def hand(self, layer: int) -> None:
        """Layer ``layer`` is in the cache (queued on the caller's current stream): pack and store it."""
        self._raise_if_stopped()
        ev = None
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with self.cond:
            self.handed.append(ev)
            self.cond.notify_all()
        if self.thread is None:
            self._start()

    def _next_layer(self, layer: int) -> bool:
        """Wait until layer ``layer`` is handed over; False when cancelled first."""
        with self.cond:
            while len(self.handed) <= layer and not self.cancelled:
                self.cond.wait()
            if self.cancelled:
                return False
            ev = self.handed[layer]
        if ev is not None:
            self.stream.wait_event(ev)
        return True

    def _todo(self) -> list:
        """``(chunk index, key, start, end)`` of the chunks stored in no form and in no put in flight.

        With ``use_layerwise`` also sets ``self.missing``: per layer, the chunk indexes whose object
        of that layer is neither stored nor being put (only those are packed and put).
        """
        e = self.engine
        keys = [k for k, _, _ in self.chunks]
        disk = e.storage.disk
        busy = (lambda k: disk is not None and disk.exists_in_put_tasks(k))
        whole = e.storage.batched_exists(keys)
        if not e.layerwise:
            return [(i, *c) for i, (c, w) in enumerate(zip(self.chunks, whole)) if not w and not busy(c[0])]
        self.layer_keys = [[layer_key(k, l) for l in range(self.layers)] for k in keys]
        ask = [i for i, w in enumerate(whole) if not w]
        there = iter(e.storage.batched_exists([k for i in ask for k in self.layer_keys[i]]) if ask else [])
        self.missing = [set() for _ in range(self.layers)]
        for i in ask:
            for l, k in enumerate(self.layer_keys[i]):
                if not next(there) and not busy(k):
                    self.missing[l].add(i)
        need = set().union(*self.missing)
        return [(i, *c) for i, c in enumerate(self.chunks) if i in need]

    def _work(self, held: list) -> None:
        e = self.engine
        if not self._next_layer(0):
            return
        todo = self._todo()
        last = self.layers - 1
        sel: list = []      # the chunks packed at this layer; ``held`` holds their objects, in order
        for layer in range(self.layers):
            if layer and not self._next_layer(layer):
                return
            self.pins.release_done()
            if not todo:
                continue
            if e.layerwise:     # this layer's objects, of the chunks that miss it
                sel = [t for t in todo if t[0] in self.missing[layer]]
                held.extend(e.storage.batched_allocate([e._layer_shape(t[3] - t[2]) for t in sel], e._dtype,
                                                       fmt=e.fmt))
                if len(held) < len(sel):     # a chunk short of a layer is not stored, nor any after it
                    todo = self._shortened(todo, todo.index(sel[len(held)]))
                    sel = sel[: len(held)]
            else:               # whole chunks: allocated once, packed layer by layer
                if layer == 0:
                    todo = self._first_group(todo, held)
                sel = todo
            move_layer(held, [t[0] for t in sel], [t[2] for t in sel], self.slots, self.kv, e.layout, layer,
                       0 if e.layerwise else layer, to_chunk=True, geom=self.geom)
            if e.layerwise and layer < last:
                self._put([self.layer_keys[t[0]][layer] for t in sel], held)
        # The last layer's objects (or the whole chunks) go to storage only at the last step, so a
        # generator abandoned before it leaves no chunk that counts as stored.
        with self.cond:
            while not self.final and not self.cancelled:
                self.cond.wait()
            if self.cancelled:
                return
        if todo:
            self._put([self.layer_keys[t[0]][last] if e.layerwise else t[1] for t in sel], held)
        self.stored = sum(t[3] - t[2] for t in todo)
        if self.rest:      # the KV is final now: the rest goes whole, in store()'s batches
            stored, futures, _ = e._whole.store([t[1:] for t in self.rest], self.kv, self.slots, self.pins)
            self.stored += stored
            self.futures.extend(futures)
        self.done_event = self._event()

    def _first_group(self, todo: list, held: list) -> list:
        """Whole chunks: allocate (into ``held``) the chunks of ``store``'s first batch (a quarter of the
        slab at most), packed layer by layer; the rest (``self.rest``) are packed whole at the last step.
        A first batch without room for all of it is stored in part and the rest not at all, as ``store``
        does."""
        first = todo[: len(next(self.engine._whole.groups([t[1:] for t in todo]), []))]
        held.extend(self.engine.storage.batched_allocate([self.engine._shape(t[3] - t[2]) for t in first],
                                                         self.engine._dtype, fmt=self.engine.fmt))
        self.rest = todo[len(first):] if len(held) == len(first) else []
        return self._shortened(first, len(held), len(todo))

    def _shortened(self, todo: list, fit: int, of: int = 0) -> list:
        if fit < len(todo):
            log.warning("no slab room to store the rest of this prompt; storing %d of %d chunks", fit,
                        max(of, len(todo)))
        return todo[:fit]

    def _put(self, keys: list, held: list) -> None:
        """Hand ``held``'s objects (one per key) to storage, which takes over our references;
        ``pins`` keeps them until their packs have run (a put may drop an object at once)."""
        objs = list(held)
        held.clear()
        assert len(objs) == len(keys), (len(objs), len(keys))
        self.pins.hold(objs, self.device)
        futs = self.engine.storage.batched_submit_put_task(keys, objs)
        self.futures.extend(f for f in futs if f is not None)

    def finish(self) -> tuple[int, list]:
        """Wait for every pack and put to be queued; the caller's stream then waits for the packs."""
        with self.cond:
            self.final = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        self._raise_if_stopped()
        if self.done_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done_event)
        return self.stored, self.futures


def store_steps(op: LayerStore, result: Callable[[int, list], object]):
    """The generator ``store_layer`` returns (see ``CacheEngine.store_layer``)."""
    op.engine._register(op)      # ClosedError after CacheEngine.close()
    try:
        for layer in range(op.layers):
            op.hand(layer)
            yield None
        yield result(*op.finish())
    finally:
        op.abort()
        op.engine._unregister(op)
