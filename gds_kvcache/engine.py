"""``CacheEngine``: store, look up and retrieve KV by token ids, next to the model runner."""

from __future__ import annotations

import logging
import threading
from typing import Optional

import numpy as np
import torch

from .config import CacheEngineConfig, CacheEngineMetadata
from .errors import ClosedError, ShapeMismatchError
from .kernels import LAYOUTS, geometry
from .key import CacheEngineKey
from .layer_load import LayerRetrieve, retrieve_steps
from .layer_store import LayerStore, store_steps
from .layerwise import LAYERED, WHOLE, layer_key, stored_forms
from .memory.format import MemoryFormat
from .slot_mapping import checked_slots
from .storage.storage_manager import StorageManager
from .stream_pins import StreamPins
from .token_hash import chunk_bounds, geometry_seed, prefix_hashes, token_ids
from .whole_chunks import WholeChunks

__all__ = ["CacheEngine", "StoreResult"]

log = logging.getLogger(__name__)


class StoreResult(int):
    """Tokens newly stored; ``futures`` are the disk writes started (``.result()`` waits)."""

    futures: list


class CacheEngine:
    """Moves KV between a serving engine's paged cache and the storage tiers.

    Parameters
    ----------
    config, metadata
        ``metadata.kv_shape`` is ``(L, 2 or 1, chunk_size, H, D)`` and
        ``metadata.kv_dtype`` the cache dtype; ``config.chunk_size`` must match.
    layout
        The paged layout of ``kv_caches``: ``vllm``, ``flashinfer``, ``mla`` or
        ``cross_layer``.
    storage
        A ``StorageManager`` to share; None builds one from ``config``.

    Notes
    -----
    Tokens are cut into ``chunk_size`` chunks keyed by a prefix hash chained
    over every earlier token, so a chunk is reused only after the same
    prefix. The chain is seeded with the chunk geometry (layout, dtype,
    layers, kv, heads, head size, chunk size), so an engine of another
    geometry misses instead of reading KV of the wrong shape, and engines of
    different geometries can share one directory. Chunks already stored are
    skipped. ``retrieve`` returns a prefix: it stops at the first missing chunk.

    ``tokens`` are a 1-D integer tensor, NumPy array or list of non-negative
    ids; ``slot_mapping`` a 1-D integer tensor (CPU or CUDA), NumPy array or
    list with at least one slot per token (extra slots are ignored). Anything
    else raises ``ShapeMismatchError`` before any work starts. A negative slot
    (vLLM pads with -1) means the token has no KV in the paged cache: ``store``
    keeps only the whole chunks before the first one, ``retrieve`` loads only
    the tokens before it, and neither touches that slot. The mapping is
    checked with one device-to-host transfer per call.

    ``retrieve_layer`` and ``store_layer`` move the KV one layer at a time,
    alongside a model forward. With ``config.use_layerwise`` every chunk is
    stored as one object per layer, which lets a layer-wise retrieve read
    layer ``l + 1`` while the model computes layer ``l``; ``store``,
    ``retrieve``, ``lookup`` and ``prefetch`` then use that format too (and
    still find chunks stored whole). See ``gds_kvcache.layerwise``.
    """

    def __init__(self, config: CacheEngineConfig, metadata: CacheEngineMetadata, layout: str = "vllm",
                 storage: Optional[StorageManager] = None):
        if layout not in LAYOUTS:
            raise ShapeMismatchError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if metadata.kv_shape[2] != config.chunk_size:
            raise ShapeMismatchError(f"metadata.kv_shape chunk {metadata.kv_shape[2]} != config.chunk_size "
                                     f"{config.chunk_size}")
        if (layout == "mla") != (metadata.kv_shape[1] == 1):
            raise ShapeMismatchError(f"layout {layout!r} does not match kv_shape {metadata.kv_shape}")
        self.config = config
        self.metadata = metadata
        self.layout = layout
        self.fmt = MemoryFormat.KV_MLA_FMT if layout == "mla" else MemoryFormat.KV_2LTD
        self.storage = storage if storage is not None else StorageManager(config, metadata)
        self._own_storage = storage is None
        L, kv, _, h, d = metadata.kv_shape
        self._row = d if layout == "mla" else h * d
        self._kv = kv
        self._layers = L
        # The chunk format, not the paged layout, goes into the seed: vllm,
        # flashinfer and cross_layer caches pack identical chunk bytes, so they share chunks.
        self._seed = geometry_seed(self.fmt.name, metadata.kv_dtype, metadata.kv_shape)
        self._dtype = metadata.kv_dtype
        self.layerwise = config.use_layerwise
        self._whole = WholeChunks(self.storage, layout, self.fmt, self._dtype, kv, L, self._row)
        self._ops: set = set()       # layer-wise operations in progress; close() cancels them
        self._ops_lock = threading.Lock()   # orders an operation's start against close()
        self._pins = StreamPins()    # store()'s objects whose packs may not have run yet
        self._closed = False

    def _keys(self, tokens: np.ndarray) -> list[tuple[CacheEngineKey, int, int]]:
        m = self.metadata
        bounds = chunk_bounds(len(tokens), self.config.chunk_size)
        return [(CacheEngineKey(m.fmt, m.model_name, m.world_size, m.worker_id, h), s, e)
                for h, (s, e) in zip(prefix_hashes(tokens, self.config.chunk_size, self._seed), bounds)]

    def _check_cache(self, kv_caches):
        """The paged cache's geometry, checked against ``metadata`` (a cache of another head split
        with the same row size would otherwise pack and unpack without complaint)."""
        geom = geometry(self.layout, kv_caches)
        t = kv_caches if isinstance(kv_caches, torch.Tensor) else kv_caches[0]
        if any(x.is_meta for x in ([kv_caches] if isinstance(kv_caches, torch.Tensor) else kv_caches)):
            raise ShapeMismatchError("kv_caches must hold data (the paged KV); got tensors on the meta device")
        L, kv, _, h, d = self.metadata.kv_shape
        heads, size = (h, t.shape[-1]) if self.layout == "mla" else (t.shape[-2], t.shape[-1])
        if (geom.num_layers, geom.kv, heads, size, geom.dtype) != (L, kv, h, d, self.metadata.kv_dtype):
            raise ShapeMismatchError(
                f"kv_caches hold {geom.num_layers} layers x {geom.kv} x {heads} heads x {size} {geom.dtype}; "
                f"metadata.kv_shape {self.metadata.kv_shape} {self.metadata.kv_dtype} needs {L} layers x {kv} x "
                f"{h} heads x {d}")
        return geom

    def _check_slots(self, n: int, kv_caches, slot_mapping) -> tuple[torch.Tensor, int]:
        """The mapping as int64 on the cache's device, and how many leading tokens have a slot.

        Checked once per call (one device-to-host transfer), so the per-chunk
        kernels need not sync.
        """
        geom = self._check_cache(kv_caches)
        self._pins.release_done()    # earlier stores' objects whose packs have run since
        return checked_slots(slot_mapping, n, geom.device, geom.num_slots)

    def store(self, tokens, kv_caches, slot_mapping) -> StoreResult:
        """Pack each chunk not yet stored into the slab and hand it to storage (non-blocking).

        Returns the number of tokens newly stored; ``.futures`` holds the disk puts.
        Only whole chunks before the first negative slot are stored: a token
        without a slot has no KV, and the chunk's slab rows would hold stale
        bytes; later chunks' keys chain over it.
        """
        if self.layerwise:
            *_, result = self.store_layer(tokens, kv_caches, slot_mapping)
            return result
        toks = token_ids(tokens)
        slots, valid = self._check_slots(len(toks), kv_caches, slot_mapping)
        disk = self.storage.disk
        chunks = [(k, s, e) for k, s, e in self._keys(toks) if e <= valid]
        there = self.storage.batched_exists([k for k, _, _ in chunks])     # one disk (Redis) query
        todo = [c for c, t in zip(chunks, there)
                if not t and not (disk is not None and disk.exists_in_put_tasks(c[0]))]
        stored, futures, _ = self._whole.store(todo, kv_caches, slots, self._pins)
        return _store_result(stored, futures)

    def _shape(self, tokens: int) -> tuple:
        return self._whole.shape(tokens)

    def _layer_shape(self, tokens: int) -> tuple:
        return (self._kv, 1, tokens, self._row)

    def lookup(self, tokens) -> int:
        """Tokens of the longest stored prefix (whole chunks, plus a stored partial last chunk).

        With ``use_layerwise`` a chunk stored per layer counts when its first
        and last layer's objects are there (eviction drops a chunk's layers
        in the order they were last read, the first layer first, and a store
        writes the last layer last); a middle layer lost anyway is seen by
        ``retrieve_layer``'s plan, which asks for every layer (a shorter count,
        never wrong KV).
        """
        keys = self._keys(token_ids(tokens))
        n = len(stored_forms(self.storage, [k for k, _, _ in keys], self._layers, self.layerwise))
        return keys[n - 1][2] if n else 0

    def prefetch(self, tokens) -> None:
        """Start moving the stored prefix's chunks from disk into the hot tier; returns at once.

        The chunks stored whole go as one batch, then those stored per layer as
        one batch per layer in layer order, so a ``retrieve_layer`` that follows
        can release layer 0 once its own batch has landed, not after every layer.
        """
        keys = [k for k, _, _ in self._keys(token_ids(tokens))]
        forms = stored_forms(self.storage, keys, self._layers, self.layerwise)
        whole = [k for k, f in zip(keys, forms) if f == WHOLE]
        layered = [k for k, f in zip(keys, forms) if f == LAYERED]
        if whole:
            self.storage.batched_submit_prefetch_task(whole)
        for layer in range(self._layers if layered else 0):
            self.storage.batched_submit_prefetch_task([layer_key(k, layer) for k in layered])

    def retrieve(self, tokens, kv_caches, slot_mapping) -> int:
        """Load the stored prefix into the paged cache at ``slot_mapping``; tokens loaded.

        Returns once the KV is in ``kv_caches`` (the copy kernels are
        synchronized before slab memory is released). Stops before the first
        negative slot: nothing is written for it or for any token after it.

        Notes
        -----
        The prefix is read in batches of up to a quarter of the slab (one
        batched read each, few large transfers), so a prompt larger than the
        slab still loads whole.
        """
        if self.layerwise:
            *_, loaded = self.retrieve_layer(tokens, kv_caches, slot_mapping)
            return loaded
        toks = token_ids(tokens)
        slots, valid = self._check_slots(len(toks), kv_caches, slot_mapping)
        keys = [k for k in self._keys(toks) if k[1] < valid]
        keys = keys[: self.storage.batched_contains([k for k, _, _ in keys])]
        loaded = 0
        for group in self._whole.groups(keys):
            got, ok = self._whole.retrieve(group, kv_caches, slots, valid)
            loaded = got or loaded
            if not ok:
                break
        return loaded

    def retrieve_layer(self, tokens, kv_caches, slot_mapping):
        """Load the stored prefix one layer at a time: a generator, advanced once per decoder layer.

        Arguments are checked now (``ShapeMismatchError``, ``ClosedError``)
        and ``slot_mapping`` is copied (the caller may refill its buffer right
        after the call); nothing is read until the first ``next()``. The
        generator yields ``num_layers + 2`` times:

        1. the first ``next()`` looks the prefix up, starts a loader thread and
           yields the tokens it will load if nothing fails;
        2. the ``(l + 2)``-th ``next()`` returns once layer ``l``'s KV is in
           ``kv_caches`` and yields the tokens it holds. On a GPU that is
           stream-ordered: work queued afterwards on the stream current on the
           calling thread (for the cache's device) runs after layer ``l``'s
           copies, and the host does not wait for them; on the host the bytes
           are in place when it returns;
        3. the last ``next()`` waits for the loader to end (its copies done,
           its slab memory released) and yields the tokens loaded in every
           layer; the generator is then exhausted.

        The loader reads layer ``l + 1`` while the caller computes layer ``l``
        (chunks stored whole are all read before layer 0 is released), and
        holds one layer of slab at a time. Work queued on the caller's stream
        before the first ``next()`` is ordered before the first copy. The plan
        asks for every layer object of the prefix. Counts are prefixes and only
        shrink: a chunk lost or corrupt after the plan, or one the slab has no
        room for even after making room and waiting ``layer_load.ROOM_WAIT_S``,
        is dropped from that layer on, with every later chunk (each case logs
        its own warning); treat only the final count as loaded. Closing the
        generator early (or dropping it) cancels the loader and returns once
        nothing more will be written; ``CacheEngine.close()`` does the same, and
        the next ``next()`` raises ``ClosedError``.
        """
        self._check_open()
        toks = token_ids(tokens)
        slots, valid = self._check_slots(len(toks), kv_caches, slot_mapping)
        return retrieve_steps(LayerRetrieve(self, toks, kv_caches, slots, valid))

    def store_layer(self, tokens, kv_caches, slot_mapping):
        """Store the chunks not yet stored one layer at a time: a generator, advanced once per layer.

        Arguments are checked now and ``slot_mapping`` is copied (the caller
        may refill its buffer right after the call). The generator yields
        ``num_layers + 1`` times: the ``(l + 1)``-th ``next()`` says layer
        ``l``'s KV is complete in ``kv_caches`` (queued on the stream current
        on the calling thread) and returns at once; a thread packs it into
        slab objects on a stream of its own after that point and, with
        ``use_layerwise``, starts its disk writes. The last ``next()`` waits
        until every pack and put is queued, orders the caller's stream after
        the packs, and yields a ``StoreResult`` equal to ``store``'s for the
        same arguments (whole chunks are written from there). Without
        ``use_layerwise`` only ``store``'s first batch (a quarter of the slab
        at most) is packed layer by layer; the chunks after it are packed whole
        at the last step, in ``store``'s batches, which may wait for slab room
        as ``store`` does. Do not change the slots' KV of layer ``l`` between
        its step and the last one. The last layer's objects (or the whole
        chunks) are put only at the last step, so a generator closed or
        dropped before it leaves no chunk that counts as stored;
        ``CacheEngine.close()`` cancels it and the next ``next()`` raises
        ``ClosedError``.

        A generator kept alive but not advanced to its end holds slab objects
        it packed (without ``use_layerwise`` those of ``store``'s first batch,
        with it the last layer's and the latest layer put's) until it is
        advanced to the end, closed, dropped or ``close()`` runs: other stores
        meanwhile wait for that room and reads may miss for want of it.
        Advance it to the end or close it once the forward is over.
        """
        self._check_open()
        toks = token_ids(tokens)
        slots, valid = self._check_slots(len(toks), kv_caches, slot_mapping)
        return store_steps(LayerStore(self, toks, kv_caches, slots, valid), _store_result)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("cache engine is closed")

    def _register(self, op) -> None:
        """A layer-wise operation starts (its generator's first ``next()``): ``ClosedError`` once
        ``close`` began, else ``close`` will cancel it."""
        with self._ops_lock:
            self._check_open()
            self._ops.add(op)

    def _unregister(self, op) -> None:
        with self._ops_lock:
            self._ops.discard(op)

    def close(self) -> None:
        """Cancel layer-wise operations in progress (they stop writing first), then close the storage.

        A ``retrieve_layer`` or ``store_layer`` generator made before and first
        advanced after raises ``ClosedError`` and writes nothing.
        """
        with self._ops_lock:
            self._closed = True
            ops = list(self._ops)
        for op in ops:
            op.abort(closed=True)
        self._pins.release_all()
        if self._own_storage:
            self.storage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _store_result(stored: int, futures: list) -> StoreResult:
    result = StoreResult(stored)
    result.futures = futures
    return result
