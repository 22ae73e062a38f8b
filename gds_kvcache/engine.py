"""``CacheEngine``: store, look up and retrieve KV by token ids, next to the model runner."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Optional

import torch

from .config import CacheEngineConfig, CacheEngineMetadata
from .errors import ShapeMismatchError
from .kernels import LAYOUTS, geometry, pack, unpack
from .key import CacheEngineKey
from .memory.format import MemoryFormat
from .storage.storage_manager import StorageManager
from .token_hash import chunk_bounds, prefix_hashes

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
    prefix. Chunks already stored are skipped. ``retrieve`` returns a prefix:
    it stops at the first missing chunk.
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

    def _keys(self, tokens) -> list[tuple[CacheEngineKey, int, int]]:
        m = self.metadata
        bounds = chunk_bounds(len(tokens), self.config.chunk_size)
        return [(CacheEngineKey(m.fmt, m.model_name, m.world_size, m.worker_id, h), s, e)
                for h, (s, e) in zip(prefix_hashes(tokens, self.config.chunk_size), bounds)]

    def _check_slots(self, tokens, kv_caches, slot_mapping) -> torch.Tensor:
        """The mapping, checked once against the cache, so per-chunk kernels need not sync."""
        slots = torch.as_tensor(slot_mapping)
        if slots.dim() != 1 or slots.numel() < len(tokens):
            raise ShapeMismatchError(f"slot_mapping needs one slot per token ({len(tokens)}), got "
                                     f"{tuple(slots.shape)}")
        geom = geometry(self.layout, kv_caches)
        if len(tokens) and int(slots[: len(tokens)].max()) >= geom.num_slots:
            raise ShapeMismatchError(f"slot_mapping holds a slot past the cache's {geom.num_slots} slots")
        return slots

    def store(self, tokens, kv_caches, slot_mapping) -> StoreResult:
        """Pack each chunk not yet stored into the slab and hand it to storage (non-blocking).

        Returns the number of tokens newly stored; ``.futures`` holds the disk puts.
        """
        slots = self._check_slots(tokens, kv_caches, slot_mapping)
        stored = 0
        futures: list[Future] = []
        for key, s, e in self._keys(tokens):
            if self.storage.contains(key) or (self.storage.disk is not None
                                              and self.storage.disk.exists_in_put_tasks(key)):
                continue
            obj = self.storage.allocate((self._kv, self._layers, e - s, self._row), self.metadata.kv_dtype,
                                        fmt=self.fmt)
            if obj is None:
                log.warning("no slab room to store chunk %s; stopping this store", key.to_string())
                break
            try:
                pack(kv_caches, self.layout, slots[s:e], obj.tensor, check=False)
            except BaseException:
                obj.ref_count_down()
                raise
            fut = self.storage.put(key, obj)
            if fut is not None:
                futures.append(fut)
            stored += e - s
        result = StoreResult(stored)
        result.futures = futures
        return result

    def lookup(self, tokens) -> int:
        """Tokens of the longest stored prefix (whole chunks, plus a stored partial last chunk)."""
        n = 0
        for key, s, e in self._keys(tokens):
            if not self.storage.contains(key):
                break
            n = e
        return n

    def prefetch(self, tokens) -> None:
        """Start moving the stored prefix's chunks from disk into the hot tier."""
        for key, _, _ in self._keys(tokens):
            if not self.storage.contains(key):
                break
            self.storage.prefetch(key)

    def retrieve(self, tokens, kv_caches, slot_mapping) -> int:
        """Load the stored prefix into the paged cache at ``slot_mapping``; tokens loaded.

        Returns once the KV is in ``kv_caches`` (the copy kernels are
        synchronized before slab memory is released).
        """
        slots = self._check_slots(tokens, kv_caches, slot_mapping)
        keys = self._keys(tokens)
        # Start every disk read of the prefix at once so they overlap; each
        # get below then waits only for its own chunk.
        for key, _, _ in keys:
            if not self.storage.contains(key):
                break
            self.storage.prefetch(key)
        held = []
        loaded = 0
        try:
            for key, s, e in keys:
                obj = self.storage.get(key)
                if obj is None:
                    break
                held.append(obj)
                if tuple(obj.shape) != (self._kv, self._layers, e - s, self._row) or \
                        obj.dtype != self.metadata.kv_dtype:
                    log.warning("chunk %s holds %s %s, not this model's; stopping", key.to_string(),
                                tuple(obj.shape), obj.dtype)
                    break
                unpack(obj.tensor, kv_caches, self.layout, slots[s:e], check=False)
                loaded = e
        finally:
            if held and held[0].device.type == "cuda":
                # The slab extent may be reused (even by a DMA from another
                # thread) as soon as it is released: the copies must be done.
                torch.cuda.current_stream(held[0].device).synchronize()
            for obj in held:
                obj.ref_count_down()
        return loaded

    def close(self) -> None:
        if self._own_storage:
            self.storage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
