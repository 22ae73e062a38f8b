"""The staging lanes of a process, shared by every thread of its engines: a batch takes a lane, then gives it back.

Invariants
----------
* A lane is held by at most one batch at a time; ``acquire`` blocks while
  every lane is held, and a released lane goes to the longest waiter.
* Each user holds a share: an engine from ``attach`` until it lets go of
  the slab, and each batch from its start to its end (``share``/``close``).
  The last ``close`` closes the lanes and frees the bounce buffers, so they
  are never freed under a batch that still copies or does file I/O through
  them.
* ``acquire`` never returns a lane of a closed pool: it raises
  ``ClosedError``, also when the pool closed while the caller waited.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Optional

from ..errors import ClosedError
from .staging import Lane

__all__ = ["LanePool"]

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("event", "lane")

    def __init__(self):
        self.event = threading.Event()
        self.lane: Optional[Lane] = None


class LanePool:
    """A fixed set of lanes over one set of bounce buffers, shared by every thread of an engine.

    Parameters
    ----------
    lanes
        The lanes, made up front (their memory is pinned once, never on a
        transfer's path).
    owned
        Closed with the pool (the bounce buffers the lanes share).
    describe
        One line for reports: how many lanes, slots and bytes.
    device
        The CUDA device the lanes copy to and from (None: not a GPU's).

    Notes
    -----
    ``acquire`` blocks until a lane is free: the lanes bound how many threads
    stage at once, whatever the number of concurrent batches. A released lane
    goes straight to the longest waiter, so a busy caller that releases and
    asks again cannot starve another. A holder never waits for anything but
    its own copies and file I/O, so every waiter gets a lane.

    Users hold shares (see the module's invariants): the pool starts with one
    (its maker's), ``share`` adds one, each ``close`` drops one, and the last
    closes the lanes and the memory, then calls ``on_close``. Several engines
    share a pool this way, and each batch holds a share for as long as it
    runs, so an engine that lets go of the pool (a new ``attach``, ``close``)
    never frees it under a batch.
    """

    def __init__(self, lanes: list, owned=(), describe: str = "", device: Optional[int] = None, on_close=None):
        self._all = list(lanes)
        self._free = list(lanes)
        self._owned = list(owned)
        self._waiters: deque = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._users = 1
        self._on_close = on_close
        self.describe = describe
        self.device = device

    def share(self) -> bool:
        """One more user of the pool (pair with ``close``); False if it is already closed (make a new one)."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    @property
    def size(self) -> int:
        return len(self._all)

    def acquire(self) -> Lane:
        """A free lane, after waiting for one if need be; ``ClosedError`` if the pool is (or got) closed.

        The caller must hold a share of the pool (see ``share``) until it released the lane.
        """
        with self._lock:
            if self._closed:
                raise ClosedError("the staging lanes are closed")
            if self._free and not self._waiters:
                return self._free.pop()
            w = _Waiter()
            self._waiters.append(w)
        w.event.wait()
        with self._lock:
            # A lane handed over just before the last close is closed by now: never give it out.
            if w.lane is None or self._closed:
                raise ClosedError("the staging lanes are closed")
            return w.lane

    def release(self, lane: Lane) -> None:
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.lane = lane
                w.event.set()
            else:
                self._free.append(lane)

    def close(self) -> None:
        """Drop one share; the last closes every lane and the bounce buffers.

        Every batch holds a share while it runs, so the last close comes after
        the last batch released its lane: nothing copies or does I/O through
        the slots any more.
        """
        with self._lock:
            if self._closed:
                return
            self._users -= 1
            if self._users > 0:
                return
            self._closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for w in waiters:
            w.event.set()
        for lane in self._all:
            try:
                lane.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort, the memory goes next
                log.warning("closing a GPU staging lane failed: %s", e)
        for o in self._owned:
            o.close()
        if self._on_close is not None:
            self._on_close(self)
