"""The store side of layer-wise operations: ``CacheEngine.store_layer``'s thread and generator.

Each step hands over one layer the caller has finished (an event on its
stream); a thread packs it into slab objects on a stream of its own and,
for per-layer objects, starts its disk writes. Invariant: the last layer's
objects (or the whole chunks) go to storage only at the last step, so a
generator abandoned before it leaves no chunk that counts as stored (see
``gds_kvcache.layerwise`` for the format and the shared guarantees).
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
        """``(chunk index, key, start, end)`` of the chunks stored in no form and in no put in flight."""
        e = self.engine
        keys = [k for k, _, _ in self.chunks]
        disk = e.storage.disk
        busy = (lambda k: disk is not None and disk.exists_in_put_tasks(k))
        whole = e.storage.batched_exists(keys)
        if not e.layerwise:
            return [(i, *c) for i, (c, w) in enumerate(zip(self.chunks, whole)) if not w and not busy(c[0])]
        self.layer_keys = [[layer_key(k, l) for l in range(self.layers)] for k in keys]
        ask = [lk for lk, w in zip(self.layer_keys, whole) if not w]
        there = iter(e.storage.batched_exists([k for lk in ask for k in lk]) if ask else [])
        return [(i, *c) for i, (c, w, lk) in enumerate(zip(self.chunks, whole, self.layer_keys))
                if not w and not all([next(there) or busy(k) for k in lk])]

    def _work(self, held: list) -> None:
        e = self.engine
        if not self._next_layer(0):
            return
        todo = self._todo()
        for layer in range(self.layers):
            if layer and not self._next_layer(layer):
                return
            if not todo:
                continue
            if e.layerwise or layer == 0:   # per-layer objects each layer; whole chunks once
                shape = e._layer_shape if e.layerwise else e._shape
                held[:] = e.storage.batched_allocate([shape(t[3] - t[2]) for t in todo], e._dtype, fmt=e.fmt)
                todo = self._shortened(todo, len(held))
            move_layer(held[: len(todo)], [t[0] for t in todo], [t[2] for t in todo], self.slots, self.kv,
                       e.layout, layer, 0 if e.layerwise else layer, to_chunk=True)
            if e.layerwise and layer < self.layers - 1:
                self._put([self.layer_keys[t[0]][layer] for t in todo], held)
        # The last layer's objects (or the whole chunks) go to storage only at the last step, so a
        # generator abandoned before it leaves no chunk that counts as stored.
        with self.cond:
            while not self.final and not self.cancelled:
                self.cond.wait()
            if self.cancelled:
                return
        if todo:
            last = self.layers - 1
            self._put([self.layer_keys[t[0]][last] if e.layerwise else t[1] for t in todo], held)
        self.stored = sum(t[3] - t[2] for t in todo)
        self.done_event = self._event()

    def _shortened(self, todo: list, fit: int) -> list:
        if fit < len(todo):
            log.warning("no slab room to store the rest of this prompt; storing %d of %d chunks", fit, len(todo))
        return todo[:fit]

    def _put(self, keys: list, held: list) -> None:
        """Hand ``held``'s objects to storage (it takes over our references; its put waits for our stream)."""
        objs = list(held[: len(keys)])
        for o in held[len(keys):]:
            o.ref_count_down()
        held.clear()
        futs = self.engine.storage.batched_submit_put_task(keys, objs)
        self.futures.extend(f for f in futs if f is not None)

    def finish(self) -> tuple[int, list]:
        """Wait for every pack and put to be queued; the caller's stream then waits for the packs."""
        with self.cond:
            self.final = True
            self.cond.notify_all()
        self.thread.join()
        self._raise_if_stopped()
        if self.done_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done_event)
        return self.stored, self.futures


def store_steps(op: LayerStore, result: Callable[[int, list], object]):
    """The generator ``store_layer`` returns (see ``CacheEngine.store_layer``)."""
    op.engine._ops.add(op)
    try:
        for layer in range(op.layers):
            op.hand(layer)
            yield None
        yield result(*op.finish())
    finally:
        op.abort()
        op.engine._ops.discard(op)
