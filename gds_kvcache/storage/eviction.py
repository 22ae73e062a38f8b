"""How a disk index gives back the extents it drops: the eviction strategy.

``DiskIndex`` decides *which* chunk goes (LRU order, never one being read);
the strategy decides *when its extent may be reused* and who makes room when
the pool or the file system is full:

* ``FreeAtOnce`` (one process owns the directory): the index evicts LRU
  chunks by itself while reserving, and an extent no local reader uses is
  free at once.
* ``DeferredFree`` (other processes may read the extents, shared mode): the
  index never evicts by itself; every extent it drops is *retired* and freed
  only when the owner says no one can be reading it any more (for shared
  mode: retracted from Redis, then the last lease ended). Subclasses make
  room (``make_room``, ``on_full``) with the index's ``eviction_candidates``
  and ``evict``.

Invariant kept by both: an extent is reused only after its delete record is
appended, and never while a reader (local pin or, deferred, remote lease)
may still read it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .disk_index import DiskIndex
    from .entry import DiskEntry

__all__ = ["EvictionStrategy", "FreeAtOnce", "DeferredFree"]


class EvictionStrategy:
    """The seam between the index (which chunk goes) and the extent's owner (when it is reused).

    The index calls ``retire`` under its lock for every dropped extent that no
    local reader uses; the backend calls ``make_room`` before reserving and
    ``on_full`` when the file system refuses a write. Methods other than
    ``retire`` run outside the index lock.
    """

    #: The index may drop LRU chunks on its own to make room (reservations, its file reserve).
    evicts_inline: bool = True

    def attach(self, index: "DiskIndex", punch: Callable[[int, int], None]) -> None:
        """Called once by the backend that owns ``index``; ``punch(offset, size)`` gives an
        extent's blocks back to the file system."""
        self.index = index
        self.punch = punch

    def retire(self, entry: "DiskEntry") -> bool:
        """An extent the index dropped and no local reader uses: True frees it now; False keeps
        it from reuse until the strategy calls ``index.free(entry.offset)`` itself."""
        return True

    def make_room(self, nbytes: int, adding: int, force: bool = False) -> None:
        """Before a reservation of ``nbytes`` for ``adding`` chunks (no-op: the index evicts inline).
        ``force``: a reservation was refused; evict ``nbytes`` even if that many are free in pieces."""

    def on_full(self) -> bool:
        """The file system is full: drop the LRU chunk nobody reads and give its blocks back;
        False when none is left."""
        victim = self.index.evict_one()
        if victim is None:
            return False
        _, off, size = victim
        self.punch(off, size)
        self.index.free(off)
        return True


class FreeAtOnce(EvictionStrategy):
    """One process owns the directory: extents are reused as soon as no local reader holds them."""


class DeferredFree(EvictionStrategy):
    """Extents are retired, not freed, until their owner releases them (``drain``, ``release``).

    The index never evicts by itself; ``make_room`` and ``on_full`` evict
    nothing here (subclasses evict, since only they know when an extent is
    safe to drop).
    """

    evicts_inline = False

    def __init__(self):
        self._retired: list["DiskEntry"] = []
        self._lock = threading.Lock()

    def retire(self, entry: "DiskEntry") -> bool:
        with self._lock:
            self._retired.append(entry)
        return False

    def make_room(self, nbytes: int, adding: int, force: bool = False) -> None:
        pass

    def on_full(self) -> bool:
        return False

    def drain(self) -> list["DiskEntry"]:
        """Extents retired since the last call; the owner releases each once no one reads it."""
        with self._lock:
            out, self._retired = self._retired, []
        return out

    def requeue(self, entries: Sequence["DiskEntry"]) -> None:
        """Put back retired entries the owner could not release yet."""
        with self._lock:
            self._retired[:0] = entries

    def take(self, entries: Sequence["DiskEntry"]) -> list["DiskEntry"]:
        """Take ``entries`` off the retired list (those on it), leaving the rest to ``drain``."""
        want = {id(e) for e in entries}
        with self._lock:
            out = [e for e in self._retired if id(e) in want]
            self._retired = [e for e in self._retired if id(e) not in want]
        return out

    def pending(self) -> int:
        with self._lock:
            return len(self._retired)

    def release(self, entry: "DiskEntry", punch: Optional[bool] = True) -> None:
        """Reuse a retired extent: give its blocks back, then free it in the index."""
        if punch:
            self.punch(entry.offset, entry.phys_size)
        self.index.free(entry.offset)
