"""``StorageBackendInterface``: the one tier seam (LMCache's storage-backend contract, batch API, close).

Every tier the storage manager holds (the hot tier, the local disk tier, the
shared disk tier) implements it. The abstract methods are LMCache's
single-key calls; the batch calls (LMCache v1 names) and the capabilities a
caller may ask about are documented default methods here, so a front end
never probes a tier with ``getattr``: a tier overrides a default only where it
can do better (one transfer for a batch) or differs (shared lookups answer for
every tensor-parallel rank).
"""

from __future__ import annotations

import abc
from concurrent.futures import Future
from typing import Optional, Sequence

from ..key import CacheEngineKey
from ..memory.obj import MemoryObj

__all__ = ["StorageBackendInterface"]


class StorageBackendInterface(abc.ABC):
    """A tier that stores ``MemoryObj`` chunks by key."""

    def __init__(self, dst_device: str = "cuda"):
        self.dst_device = dst_device

    # -- LMCache's single-key contract --------------------------------------------------
    @abc.abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored (fully written) in this backend."""

    @abc.abstractmethod
    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        """Whether a put of ``key`` is in flight."""

    @abc.abstractmethod
    def submit_put_task(self, key: CacheEngineKey, obj: MemoryObj) -> Optional[Future]:
        """Start storing ``obj``; a future for the put, or None if ``key`` is stored or in flight.

        The backend takes its own reference on ``obj`` for as long as it needs it.
        """

    @abc.abstractmethod
    def submit_prefetch_task(self, key: CacheEngineKey) -> Optional[Future]:
        """Start loading ``key``; a future of ``MemoryObj | None``, or None if ``key`` is absent."""

    @abc.abstractmethod
    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The chunk (one reference owned by the caller), or None if absent."""

    @abc.abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop ``key``; True if it was there."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish pending writes and release every resource."""

    # -- batch API (LMCache v1 names); defaults loop over the single-key calls -------------
    def batched_submit_put_task(self, keys: Sequence[CacheEngineKey],
                                objs: Sequence[MemoryObj]) -> list[Optional[Future]]:
        """``submit_put_task`` for each pair; a disk tier writes the batch as one transfer."""
        return [self.submit_put_task(k, o) for k, o in zip(keys, objs)]

    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> list:
        """Store and wait: per key, what its put's future gave (bytes written), None where the
        tier skipped it, or the exception it raised (one failed chunk does not hide the others)."""
        out = []
        for f in self.batched_submit_put_task(keys, objs):
            if f is None:
                out.append(None)
                continue
            try:
                out.append(f.result())
            except Exception as e:
                out.append(e)
        return out

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """``get_blocking`` for each key; a disk tier reads the batch as one transfer."""
        return [self.get_blocking(k) for k in keys]

    def batched_submit_prefetch_task(self, keys: Sequence[CacheEngineKey]) -> Optional[Future]:
        """Start reading ``keys``; None if none is stored, else a future of the list of chunks
        (``MemoryObj | None`` each, one reference each, the future's consumer's)."""
        futs = [self.submit_prefetch_task(k) for k in keys]
        if all(f is None for f in futs):
            return None
        out: Future = Future()
        left = [sum(f is not None for f in futs)]

        def one(_: Future) -> None:
            left[0] -= 1
            if left[0] == 0:
                out.set_result([None if f is None or f.exception() else f.result() for f in futs])

        for f in futs:
            if f is not None:
                f.add_done_callback(one)
        return out

    def batched_contains(self, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored (the hit prefix)."""
        n = 0
        for k in keys:
            if not self.contains(k):
                break
            n += 1
        return n

    def batched_exists(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Per key, whether it is stored (not only the hit prefix)."""
        return [self.contains(k) for k in keys]

    # -- capabilities: what a front end may rely on, with the answer of a plain tier -------
    def lookup_for_all_ranks(self) -> bool:
        """Whether ``contains``/``batched_contains`` of a tensor-parallel key already answer for
        every rank's shard (a shared index does; a tier of this rank alone does not)."""
        return False

    def put_skips_stored(self) -> bool:
        """Whether a put already skips keys stored anywhere this tier knows of (so a caller
        need not ask ``batched_exists`` first)."""
        return False

    def entry_size(self, key: CacheEngineKey) -> int:
        """Bytes of slab a read of ``key`` will take (0 if this tier cannot say without I/O)."""
        return 0

    def wait_for_put_progress(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until some put in flight finishes, freeing the slab room it
        held; False if none was in flight or none finished in time."""
        return False

    def wait_for_puts(self, timeout: Optional[float] = None) -> bool:
        """Wait until no put is in flight; False if ``timeout`` passed first."""
        return True

    def evict_unused(self, nbytes: int) -> int:
        """Drop chunks no caller holds until ``nbytes`` of slab are free again; bytes freed
        (a disk tier holds no slab between calls: 0)."""
        return 0

    def io_report(self):
        """Which I/O path this tier's transfers ran on (``IOPathReport``), or None for a tier without I/O."""
        return None

    def memcheck(self) -> bool:
        """Verify internal invariants; raise ``AssertionError`` if broken."""
        return True

    @property
    def stats(self) -> dict:
        """Counters of this tier (hits, misses, errors, ...); names are tier-specific."""
        return {}
