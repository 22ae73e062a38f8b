"""Layer-wise retrieve and store: a prompt's KV moved one layer at a time, next to a model forward.

``CacheEngine.retrieve_layer`` and ``store_layer`` (LMCache's names) return
generators the caller advances once per decoder layer; this module holds the
per-layer format and the operation base both share (``layer_load`` is the
retrieve side, ``layer_store`` the store side), each operation on a thread of
its own so that disk reads, checksums and kernel launches never hold up the
caller's forward.

Storage format. A chunk is either one object holding every layer (``store``,
the default) or, with ``use_layerwise``, one object per layer under a key
derived from the chunk's key (``layer_key``). Attention over the new tokens
at layer ``l`` needs layer ``l`` of every cached chunk, and a chunk's
checksum covers the whole object, so whole-chunk objects can only be used
once every chunk has been read in full: the first layer waits for the whole
prefix. Per-layer objects are read, verified and unpacked one layer at a
time, so the read of layer ``l + 1`` overlaps the caller's compute of layer
``l`` (after layer 0, ``LOOKAHEAD`` later layers are read ahead into the hot
tier by the storage's reader threads). Whole chunks still load (first, all
layers at once) in either mode, so existing directories keep working; an
engine without ``use_layerwise`` does not look for per-layer objects.

Invariants: no byte that failed its checksum (or has the wrong shape) reaches
the paged cache; a chunk counts only when every layer of it loaded, and the
counts are prefixes (a chunk missing at some layer drops it and every later
chunk from that layer on). Nothing is written into the caller's cache after
the generator is closed, finished or abandoned, or after ``CacheEngine.close``
returns: the work is cancelled, its stream synchronised and its slab objects
released before those return.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import nullcontext
from typing import Optional

import torch

from .errors import ClosedError
from .kernels import geometry
from .key import CacheEngineKey
from .stream_pins import StreamPins

__all__ = ["LAYERED", "LOOKAHEAD", "WHOLE", "LayerOp", "layer_key", "stored_forms"]

log = logging.getLogger(__name__)

WHOLE, LAYERED = "whole", "layered"
#: Layers a layer-wise retrieve reads ahead of the one it unpacks (needs the hot tier, ``local_cpu``).
LOOKAHEAD = 2
_LAYER_SEED = b"gds_kvcache/layer-key/v1\0"


def layer_key(key: CacheEngineKey, layer: int) -> CacheEngineKey:
    """The key of layer ``layer``'s object of the chunk ``key``: same fields, a hash over the chunk
    hash and the layer (a 128-bit value like every prefix hash, so it never names another chunk)."""
    h = hashlib.blake2b(_LAYER_SEED + key.chunk_hash.encode() + b"\0%d" % layer, digest_size=16).hexdigest()
    return CacheEngineKey(key.fmt, key.model_name, key.world_size, key.worker_id, h)


def stored_forms(storage, keys: list, layers: int, layerwise: bool) -> list:
    """Per key of the stored prefix, ``WHOLE`` or ``LAYERED``: the chunks up to the first stored in neither form.

    A chunk counts as stored per layer when its first and last layer's
    objects are there (see ``CacheEngine.lookup``). Asked with
    ``batched_contains`` (one disk or Redis query per change of form; in
    shared mode a tensor-parallel chunk counts once every rank published it).
    Without ``layerwise`` only whole chunks count.
    """
    out: list = []
    probe = sorted({0, layers - 1})
    while len(out) < len(keys):
        whole = storage.batched_contains(keys[len(out):])
        out += [WHOLE] * whole
        if not layerwise or len(out) == len(keys):
            break
        rest = keys[len(out):]
        layered = storage.batched_contains([layer_key(k, l) for k in rest for l in probe]) // len(probe)
        out += [LAYERED] * layered
        if not layered:
            break
    return out


class LayerOp:
    """What a layer-wise operation shares between the caller's steps and its worker thread."""

    def __init__(self, engine, kv_caches, slots: torch.Tensor, valid: int, name: str, priority: int = 0):
        self.engine = engine
        self.kv = kv_caches
        self.geom = geometry(engine.layout, kv_caches)     # once per op: each move_layer call skips the lookup
        self.valid = valid
        self.layers = engine._layers
        self.device = slots.device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device, priority=priority) if self.cuda else None
        # Our own copy of the mapping (the engine's checked one may be the caller's own tensor, or share
        # a NumPy array's memory): the caller may refill its buffer while our worker still reads it.
        self.slots = slots.clone()
        if self.cuda:
            self.stream.wait_event(self._caller_event())   # the copy, queued on the caller's stream, first
            self.slots.record_stream(self.stream)
        self.cond = threading.Condition()
        self.cancelled = False
        self.closed = False
        self.error: Optional[BaseException] = None
        self.finished = False
        self.thread: Optional[threading.Thread] = None
        self.pins = StreamPins()     # objects handed to puts whose packs may still be queued on our stream
        self._name = name

    def _start(self) -> None:
        """Start the worker, unless the operation was cancelled first (then it is finished at once)."""
        with self.cond:     # against abort(): it joins a worker started before it, none starts after
            if self.cancelled:
                self.finished = True
                self.cond.notify_all()
                return
            self.thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self.thread.start()

    def _main(self) -> None:
        held: list = []
        try:
            dev = torch.cuda.device(self.device) if self.cuda else nullcontext()
            with dev, (torch.cuda.stream(self.stream) if self.cuda else nullcontext()):
                self._work(held)
        except BaseException as e:  # handed to the caller's next step
            self.error = e
        finally:
            try:
                if self.cuda:
                    self.stream.synchronize()  # no kernel of ours may still touch the slab or the cache
            finally:
                for o in held:
                    o.ref_count_down()
                self.pins.release_all()     # their work ran: the stream was synchronised above
                with self.cond:
                    self.finished = True
                    self.cond.notify_all()

    def _work(self, held: list) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _caller_event(self):
        """An event on the caller's current stream marking the work it queued so far (None on the host)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _event(self):
        """An event on our stream marking the work queued so far (None on the host)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def _raise_if_stopped(self) -> None:
        if self.closed:
            raise ClosedError("the cache engine was closed during a layer-wise operation")
        if self.error is not None:
            raise self.error

    def abort(self, closed: bool = False) -> None:
        """Cancel, and return once the worker has stopped, synchronised and released everything."""
        with self.cond:
            self.cancelled = True
            self.closed = self.closed or closed
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
