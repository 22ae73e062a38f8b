"""``CacheEngine``: store, look up and retrieve KV by token ids, next to the model runner."""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future
from typing import Optional

import numpy as np
import torch

from .config import CacheEngineConfig, CacheEngineMetadata
from .errors import ClosedError, ShapeMismatchError
from .kernels import LAYOUTS, geometry, pack, unpack
from .key import CacheEngineKey
from .layer_load import LayerRetrieve, retrieve_steps
from .layer_store import LayerStore, store_steps
from .layerwise import LAYERED, WHOLE, layer_key, stored_forms
from .memory.format import MemoryFormat
from .storage.storage_manager import StorageManager
from .stream_pins import StreamPins
from .token_hash import chunk_bounds, geometry_seed, prefix_hashes, token_ids

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
        slots = _slot_tensor(slot_mapping)
        if slots.numel() < n:
            raise ShapeMismatchError(f"slot_mapping needs one slot per token ({n}), got {slots.numel()}")
        slots = slots.to(device=geom.device, dtype=torch.int64)
        if n == 0:
            return slots, 0
        head = slots[:n]
        # Leading slots >= 0 (a running product of "valid" is 1 until the
        # first -1) and the largest slot, read back together.
        valid, top = torch.stack(((head >= 0).to(torch.int64).cumprod(0).sum(), head.max())).tolist()
        if top >= geom.num_slots:
            raise ShapeMismatchError(f"slot_mapping holds slot {top}, past the cache's {geom.num_slots} slots "
                                     f"(allowed: 0..{geom.num_slots - 1}, or negative for no slot)")
        return slots, valid

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
        stored, futures, _ = self._store_groups(todo, kv_caches, slots, self._pins)
        return _store_result(stored, futures)

    def _store_groups(self, todo, kv_caches, slots, pins: StreamPins) -> tuple[int, list, bool]:
        """Pack ``todo`` ((key, start, end) triples) whole on the current stream and put them, in groups.

        Returns the tokens stored, the disk puts' futures and whether every chunk found room.
        Batches of up to a quarter of the slab: a prompt larger than the slab is stored whole,
        each batch waiting for the room the last frees. ``pins`` keeps each batch's objects until
        its packs have run (a put may drop an object at once; see ``stream_pins``).
        """
        futures: list[Future] = []
        stored = 0
        total = sum(e - s for _, s, e in todo)
        for group in self._groups(todo):
            pins.release_done()
            objs = self.storage.batched_allocate([self._shape(e - s) for _, s, e in group],
                                                 self.metadata.kv_dtype, fmt=self.fmt)
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
            futs = self.storage.batched_submit_put_task([k for k, _, _ in done], objs)
            futures.extend(f for f in futs if f is not None)
            stored += sum(e - s for _, s, e in done)
            if len(done) < len(group):
                log.warning("no slab room to store the rest of this prompt; stored %d of %d tokens", stored, total)
                return stored, futures, False
        pins.release_done()
        return stored, futures, True

    def _groups(self, chunks):
        """``chunks`` ((key, start, end) triples) cut into batches of at most a quarter of the slab."""
        itemsize = self.metadata.kv_dtype.itemsize
        budget = max(1, getattr(self.storage.allocator, "capacity", 1 << 62) // 4)
        group, size = [], 0
        for c in chunks:
            n = math.prod(self._shape(c[2] - c[1])) * itemsize
            if group and size + n > budget:
                yield group
                group, size = [], 0
            group.append(c)
            size += n
        if group:
            yield group

    def _shape(self, tokens: int) -> tuple:
        return (self._kv, self._layers, tokens, self._row)

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
        for group in self._groups(keys):
            got, ok = self._retrieve_batch(group, kv_caches, slots, valid)
            loaded = got or loaded
            if not ok:
                break
        return loaded

    def _retrieve_batch(self, keys, kv_caches, slots, valid) -> tuple[int, bool]:
        """Unpack one batch; (tokens loaded up to, whether every chunk of it loaded)."""
        held = self.storage.batched_get_blocking([k for k, _, _ in keys])
        loaded, ok = 0, True
        try:
            for obj, (key, s, e) in zip(held, keys):
                if obj is None:
                    ok = False
                    break
                if tuple(obj.shape) != self._shape(e - s) or obj.dtype != self.metadata.kv_dtype:
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


def _slot_tensor(slot_mapping) -> torch.Tensor:
    """``slot_mapping`` as a 1-D integer tensor on its own device, or ``ShapeMismatchError`` saying why not."""
    allowed = "allowed: a 1-D integer tensor (CPU or CUDA), integer NumPy array or list of ints"
    if isinstance(slot_mapping, torch.Tensor):
        slots = slot_mapping
        if slots.dtype in (torch.bool, torch.complex64, torch.complex128) or slots.dtype.is_floating_point:
            raise ShapeMismatchError(f"slot_mapping is a {slots.dtype} tensor; {allowed}")
        if slots.is_meta:    # a shape without values: torch's copy would raise NotImplementedError
            raise ShapeMismatchError(f"slot_mapping must hold data (the slots); got a tensor of shape "
                                     f"{tuple(slots.shape)} on the meta device, which has none; {allowed}")
    elif isinstance(slot_mapping, (np.ndarray, list, tuple)):
        if isinstance(slot_mapping, (list, tuple)) and len(slot_mapping) == 0:
            return torch.zeros(0, dtype=torch.int64)
        try:
            arr = np.asarray(slot_mapping)
        except (ValueError, OverflowError) as e:
            raise ShapeMismatchError(f"slot_mapping is not a flat sequence of ints ({e}); {allowed}") from None
        if arr.dtype.kind not in "iu":
            raise ShapeMismatchError(f"slot_mapping holds {arr.dtype} values; {allowed}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ShapeMismatchError(f"slot_mapping holds slot {int(arr.max())}, past any cache; {allowed}")
        slots = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    else:
        raise ShapeMismatchError(f"slot_mapping is a {type(slot_mapping).__name__}; {allowed}")
    if slots.dim() != 1:
        raise ShapeMismatchError(f"slot_mapping has shape {tuple(slots.shape)}; it must be 1-D ({allowed})")
    return slots
