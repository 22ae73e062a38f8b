"""What an engine's ``attach(buffer)`` made ready, held as one unit by the engine and by each batch.

A batch must never pair one slab with another's device address or lanes,
and must never have its lanes, bounce buffers or cuFile registration freed
under it by a later ``attach`` (or ``close``). So ``attach`` builds an
``Attachment`` (slab, device base, host view, lane pool) and publishes it
whole through the engine's ``AttachPoint``; each batch takes a share at its
start and gives it back at its end.

Invariants
----------
* An attachment's fields never change once published.
* The engine holds one share from its ``attach`` until the next ``attach``
  or ``close``; each batch holds one from its start to its end. The last
  ``release`` drops the attachment's share of the lane pool (the pool frees
  its memory when no engine or batch holds it) and runs ``cleanup``.
* ``AttachPoint.swap`` publishes the new attachment before the old one
  loses the engine's share, both under the point's lock, so ``hold`` always
  finds a live attachment.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import ClosedError, IOEngineError

if TYPE_CHECKING:  # pragma: no cover
    from ..memory.buffers import SlabBuffer
    from .lane_pool import LanePool

__all__ = ["AttachPoint", "Attachment"]


class Attachment:
    """One ``attach(buffer)``: the slab, its device base, a host view and the staging lanes (see the module)."""

    __slots__ = ("buffer", "dev_base", "host_mv", "lanes", "_cleanup", "_users", "_lock")

    def __init__(self, buffer: "SlabBuffer", dev_base: int = 0, host_mv=None, lanes: "Optional[LanePool]" = None,
                 cleanup: Optional[Callable[[], None]] = None):
        self.buffer, self.dev_base, self.host_mv, self.lanes = buffer, dev_base, host_mv, lanes
        self._cleanup = cleanup
        self._users = 1
        self._lock = threading.Lock()

    def hold(self) -> bool:
        """One more share (pair with ``release``); False once the last share is gone."""
        with self._lock:
            if self._users == 0:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """Drop one share; the last lets go of the lanes, then runs ``cleanup``."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
        try:
            if self.lanes is not None:
                self.lanes.close()
        finally:
            if self._cleanup is not None:
                self._cleanup()


class AttachPoint:
    """An engine's current ``Attachment``: replaced by ``attach``, held by each batch for as long as it runs."""

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._att: Optional[Attachment] = None
        self._closed = False

    @property
    def current(self) -> Optional[Attachment]:
        """The attachment new batches get (None before the first ``attach`` and after ``close``)."""
        return self._att

    def hold(self) -> Attachment:
        """The current attachment with one more share for the calling batch: ``release`` it when done."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"the {self._name} I/O engine is closed")
            att = self._att
            if att is None:
                raise IOEngineError("no slab attached: call attach(buffer) before read_spans/write_spans")
            if not att.hold():  # cannot happen: the engine's share goes only after a swap, under this lock
                raise ClosedError(f"the {self._name} I/O engine let go of its slab")
            return att

    def swap(self, att: Attachment) -> None:
        """Make ``att`` current; the one before loses the engine's share (it goes when its last batch ends).

        After ``close``: ``att`` is released and ``ClosedError`` raised.
        """
        with self._lock:
            closed = self._closed
            old = None
            if not closed:
                old, self._att = self._att, att
        if closed:
            att.release()
            raise ClosedError(f"the {self._name} I/O engine is closed")
        if old is not None:
            old.release()

    def close(self) -> None:
        """No attachment from now on; the current one loses the engine's share."""
        with self._lock:
            self._closed = True
            old, self._att = self._att, None
        if old is not None:
            old.release()
