"""The retrieve side of layer-wise operations: ``CacheEngine.retrieve_layer``'s loader thread and generator.

The plan (the first step) looks the prefix up, every layer object of it in one
batched query, and starts a loader thread. The loader reads the chunks stored
whole first, then per-layer objects one layer at a time: it releases layer
``l - 1``'s objects (once their unpack ran) before it reads layer ``l``, so an
operation never holds more than one layer of slab, and after layer 0 it keeps
``LOOKAHEAD`` later layers in flight into the hot tier.

Invariants (with those of ``gds_kvcache.layerwise``): the planned count only
shrinks when an object is lost or unusable after the plan, or when the slab
has no room for a layer after ``ROOM_WAIT_S`` of making room and waiting (each
case with its own warning); no room is never mistaken for a loss, and a read
that found none is retried whole, holding nothing of that layer meanwhile (two
loads never wait on each other's half layers).
"""

from __future__ import annotations

import logging
import time

import torch

from . import layerwise
from .layer_moves import move_layer
from .layerwise import LAYERED, WHOLE, LayerOp, layer_key, stored_forms

__all__ = ["ROOM_WAIT_S", "LayerRetrieve", "retrieve_steps"]

log = logging.getLogger(__name__)

#: Longest a layer's read waits for slab room (for holders to release theirs) before the load shrinks.
ROOM_WAIT_S = 5.0
_PAUSE_S = (0.001, 0.05)     # first and longest pause between retries of a read that found no room


class LayerRetrieve(LayerOp):
    """One ``retrieve_layer`` call: its plan, its loader thread and what the loader has done."""

    def __init__(self, engine, toks, kv_caches, slots, valid):
        # A high-priority stream: the unpack kernels are on the forward's critical path, and should not
        # wait behind the caller's long kernels for a free multiprocessor.
        super().__init__(engine, kv_caches, slots, valid, "gds-kvcache-layer-load", priority=-1)
        self.chunks = [c for c in engine._keys(toks) if c[1] < valid]
        self.forms: list = []
        self.asked: set = set()          # layers whose read-ahead was started
        self.done = 0
        self.tokens: list[int] = []
        self.events: list = []

    def plan(self) -> int:
        """Look the prefix up, start the loader; the tokens it will load if nothing fails."""
        e = self.engine
        self.forms = stored_forms(e.storage, [k for k, _, _ in self.chunks], self.layers, e.layerwise)
        self.chunks = self.chunks[: len(self.forms)]
        self._check_every_layer()
        planned = self._tokens(len(self.chunks))
        if planned:
            eff = self.slots[:self.chunks[-1][2]].clone()
            eff[self.valid:] = -1
            self.slots_eff = eff
            self.start_event = self._caller_event()
        self._start()
        return planned

    def _check_every_layer(self) -> None:
        """Cut the plan before the first per-layer chunk with any layer missing (``stored_forms`` asked
        only for its first and last layer): one batched query for every layer of every such chunk."""
        lay = [i for i, f in enumerate(self.forms) if f == LAYERED]
        if not lay or self.layers <= 2:
            return
        keys = [layer_key(self.chunks[i][0], layer) for i in lay for layer in range(self.layers)]
        whole = self.engine.storage.batched_contains(keys) // self.layers
        if whole < len(lay):
            cut = lay[whole]
            log.info("chunk %d misses a middle layer; planning %d tokens, not %d", cut, self._tokens(cut),
                     self._tokens(len(self.chunks)))
            self.chunks, self.forms = self.chunks[:cut], self.forms[:cut]

    def _tokens(self, limit: int) -> int:
        return min(self.chunks[limit - 1][2], self.valid) if limit else 0

    def _work(self, held: list) -> None:
        limit = len(self.chunks)
        if limit and self.cuda:
            self.stream.wait_event(self.start_event)  # the caller's earlier work on these slots first
        limit = self._load_whole(limit)
        for layer in range(self.layers):
            if self.cancelled:
                return
            if limit:
                limit = self._load_layer(layer, limit, held)
            with self.cond:
                self.tokens.append(self._tokens(limit))
                self.events.append(self._event())
                self.done = layer + 1
                self.cond.notify_all()
            # Layer 0 is read alone (it gates the caller's first layer); from then on the storage's reader
            # threads keep LOOKAHEAD later layers in flight, so one layer's host work overlaps another's
            # transfer.
            for ahead in range(layer + 1, min(layer + 1 + layerwise.LOOKAHEAD, self.layers)):
                if limit and ahead not in self.asked:
                    self._read_ahead(ahead, limit)

    def _load_whole(self, limit: int) -> int:
        """Read and unpack the chunks stored whole (every layer); the chunk limit after them."""
        idx = [i for i in range(limit) if self.forms[i] == WHOLE]
        pos = 0
        for group in self.engine._whole.groups([self.chunks[i] for i in idx]):
            if self.cancelled:
                return 0
            loaded, ok = self.engine._whole.retrieve(group, self.kv, self.slots, self.valid)
            if not ok:
                return idx[pos + sum(1 for _, s, _ in group if s < loaded)]
            pos += len(group)
        return limit

    def _read_ahead(self, layer: int, limit: int) -> None:
        """Start reading layer ``layer`` of the per-layer chunks below ``limit`` into the hot tier."""
        self.asked.add(layer)
        keys = [layer_key(self.chunks[i][0], layer) for i in range(limit) if self.forms[i] == LAYERED]
        if keys:
            self.engine.storage.batched_submit_prefetch_task(keys)

    def _release(self, held: list) -> None:
        """Give back the previous layer's objects, once its unpack has run."""
        if held:
            if self.cuda:
                self.events[-1].synchronize()
            for o in held:
                o.ref_count_down()
            held.clear()

    def _load_layer(self, layer: int, limit: int, held: list) -> int:
        """Read, verify and unpack layer ``layer`` of the per-layer chunks below ``limit``; the new limit."""
        idx = [i for i in range(limit) if self.forms[i] == LAYERED]
        if not idx:
            return limit
        self._release(held)      # before the read: the slab may have room for one layer only
        objs, no_room = self._read([layer_key(self.chunks[i][0], layer) for i in idx])
        if self.cancelled:       # (a wait for room cut short): nothing more is written
            for o in objs:
                if o is not None:
                    o.ref_count_down()
            return 0
        good = 0
        for i, o in zip(idx, objs):
            _, s, e = self.chunks[i]
            if o is None or tuple(o.shape) != self.engine._layer_shape(e - s) or o.dtype != self.engine._dtype:
                break
            good += 1
        for o in objs[good:]:
            if o is not None:
                o.ref_count_down()
        if good < len(idx):
            limit = idx[good]
            if no_room:
                log.warning("no slab room to read layer %d of chunk %d after waiting %.1f s; loading %d tokens, "
                            "not %d", layer, limit, ROOM_WAIT_S, self._tokens(limit), self._tokens(len(self.chunks)))
            else:
                log.warning("layer %d of chunk %d is missing or unusable; loading %d tokens, not %d", layer, limit,
                            self._tokens(limit), self._tokens(len(self.chunks)))
        objs, idx = objs[:good], idx[:good]
        held.extend(objs)
        move_layer(objs, idx, [self.chunks[i][1] for i in idx], self.slots_eff, self.kv, self.engine.layout,
                   layer, 0, to_chunk=False, geom=self.geom)
        return limit

    def _read(self, keys: list) -> tuple[list, bool]:
        """``keys``' objects (None from the first one missing on); and whether that first one is there
        but found no slab room even after ``ROOM_WAIT_S`` of making room and waiting.

        A read that found no room gives back everything it got (another load may be waiting for that
        room), lets the storage drop unheld hot chunks or wait for disk writes in flight, and tries again.
        """
        st = self.engine.storage
        deadline, pause = None, _PAUSE_S[0]
        while True:
            objs = st.batched_get_blocking(keys)
            first = next((j for j, o in enumerate(objs) if o is None), None)
            if first is None:
                return objs, False
            if not st.batched_exists(keys[first:first + 1])[0]:
                return objs, False                       # lost (or dropped as corrupt): not a matter of room
            now = time.monotonic()
            if deadline is None:
                deadline = now + ROOM_WAIT_S
                log.info("no slab room for %d of %d layer objects; making room and waiting up to %.1f s",
                         len(keys) - first, len(keys), ROOM_WAIT_S)
            if now >= deadline or self.cancelled:
                return objs, True
            for o in objs:
                if o is not None:
                    o.ref_count_down()
            st.wait_for_read_room(keys, min(pause, deadline - now))
            pause = min(2 * pause, _PAUSE_S[1])

    def wait_layer(self, layer: int) -> int:
        """Block until layer ``layer`` is in the cache (stream-ordered on a GPU); its token count."""
        with self.cond:
            while self.done <= layer and not self.finished:
                self.cond.wait()
            self._raise_if_stopped()
            assert self.done > layer, "loader stopped without an error"
            ev, tokens = self.events[layer], self.tokens[layer]
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        return tokens

    def finish(self) -> int:
        """Wait for the loader (its stream synchronised, its objects released); the tokens loaded."""
        if self.thread is not None:
            self.thread.join()
        self._raise_if_stopped()
        return self.tokens[-1] if self.tokens else 0


def retrieve_steps(op: LayerRetrieve):
    """The generator ``retrieve_layer`` returns (see ``CacheEngine.retrieve_layer``)."""
    op.engine._register(op)      # ClosedError after CacheEngine.close()
    try:
        yield op.plan()
        for layer in range(op.layers):
            yield op.wait_layer(layer)
        yield op.finish()
    finally:
        op.abort()
        op.engine._unregister(op)
