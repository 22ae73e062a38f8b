"""``Reservations``: the pool extents a disk index hands to puts before their bytes are written.

A put reserves an extent (``reserve``), writes its bytes, then the index
commits it (``take``) or gives the extent back (``release``). A batch gets
adjacent extents where one free region holds it (one transfer, interleaved
over every pool file); otherwise each chunk its own, and where the pool is
full, LRU chunks nobody reads are evicted to make room, but only once it is
known that room can be made: a chunk that could never fit evicts nothing and
is refused with the reason. Invariants: a key is reserved at most once at a
time and never while stored; a reserved extent is recorded in the pool's
allocator until it is committed or released. Not thread-safe (the index
lock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import StorageFullError
from ..key import CacheEngineKey
from ..memory.extents import ExtentAllocator
from .entry import DiskEntry
from .live_entries import LiveEntries

__all__ = ["Reservation", "Reservations"]


@dataclass
class Reservation:
    """Pool extents handed to one batch of puts, before their bytes are written."""

    keys: list
    offsets: list
    sizes: list
    errors: dict = field(default_factory=dict)   # key -> exception for keys refused outright


class Reservations:
    """The puts in flight of one index over ``space`` (``holes``: its bytes no file backs).

    ``evict(row)`` drops a live row to make room; None: the index never evicts by
    itself (its strategy evicts ahead of the put).
    """

    def __init__(self, space: ExtentAllocator, live: Callable[[], LiveEntries], holes: int,
                 evict: Optional[Callable[[int], None]]):
        self._space = space
        self._live = live
        self._holes = holes
        self._evict = evict
        self.pending: dict[CacheEngineKey, int] = {}      # key -> extent of a put in flight
        self.cancelled: set[CacheEngineKey] = set()       # removed while their put was in flight

    @property
    def capacity(self) -> int:
        return self._space.capacity - self._holes

    def reserve(self, keys: Sequence[CacheEngineKey], sizes: Sequence[int]) -> Reservation:
        """Extents for the keys not yet stored or in flight (others are left out); see the module notes."""
        res = Reservation([], [], [])
        live = self._live()
        want: list[tuple[CacheEngineKey, int]] = []
        seen = set()
        for k, n in zip(keys, sizes):
            if k in self.pending or k in seen or live.table.find(k) >= 0:
                continue
            seen.add(k)
            if n > self.capacity:
                res.errors[k] = StorageFullError(f"a {n}-byte chunk can never fit the {self.capacity}-byte pool "
                                                 "(max_local_disk_size less the index reserve)")
                continue
            want.append((k, n))
        offs = self._space.allocate_run([n for _, n in want]) if len(want) > 1 else None
        if offs is None:
            offs = [self._allocate_evicting(n) for _, n in want]
        for (k, n), off in zip(want, offs):
            if off is None:
                res.errors[k] = StorageFullError(
                    f"no room for a {n}-byte chunk in the {self.capacity}-byte pool "
                    f"({self.capacity - (self._space.used - self._holes)} bytes free, the largest free run "
                    f"{self._space.largest_free()} bytes): the rest is held by puts in flight and chunks being "
                    "read" + ("" if self._evict is not None else " or leased by other processes"))
                continue
            res.keys.append(k)
            res.offsets.append(off)
            res.sizes.append(n)
            self.pending[k] = off
        return res

    def _allocate_evicting(self, nbytes: int) -> Optional[int]:
        off = self._space.allocate(nbytes)
        if off is not None or self._evict is None:
            return off
        # Evict only if that can work: the pool must have a hole of nbytes
        # once every chunk nobody reads is gone (in-flight puts and chunks
        # being read stay where they are).
        live = self._live()
        if live.largest_hole_without_unread() < nbytes:
            return None
        for victim in live.unread_rows():
            self._evict(victim)
            off = self._space.allocate(nbytes)
            if off is not None:
                return off
        return None

    def take(self, e: DiskEntry) -> bool:
        """A put of ``e`` is done: True if it is to be made visible (its reservation ends with the
        commit), False if it was cancelled meanwhile (its extent is given back)."""
        assert self.pending.get(e.key) == e.offset, f"commit of {e.key} without its reservation"
        if e.key in self.cancelled:
            self.release(e.key)
            return False
        return True

    def committed(self, key: CacheEngineKey) -> None:
        """The put of ``key`` is visible now: its extent is the entry's."""
        del self.pending[key]

    def release(self, key: CacheEngineKey) -> None:
        """Give back the extent of a put that will not be committed (if any)."""
        off = self.pending.pop(key, None)
        self.cancelled.discard(key)
        if off is not None:
            self._space.free_extent(off)

    def cancel(self, key: CacheEngineKey) -> bool:
        """``key`` is removed while its put is in flight: it will not become visible. False if it has
        no put in flight."""
        if key not in self.pending:
            return False
        self.cancelled.add(key)
        return True

    def check(self) -> bool:
        ext = self._space.extents()
        for k, off in self.pending.items():
            assert off in ext, f"pending put {k} extent not allocated"
        return True
