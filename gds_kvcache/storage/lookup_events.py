"""``LookupEvents``: delivery of a disk index's inserts and removals to a lookup server.

The index queues ``("insert" | "remove", key)`` events under its lock; this
class hands them to the lookup server outside every lock, in order, one
delivering thread at a time. Invariants: a slow or failing lookup server never
holds up a get or a put and never changes what is stored (its errors are
logged and counted in ``errors``); without a server the queue is drained and
dropped.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional

from .lookup_server import LookupServerInterface

if TYPE_CHECKING:  # pragma: no cover
    from .disk_index import DiskIndex

__all__ = ["LookupEvents"]

log = logging.getLogger(__name__)


class LookupEvents:
    """Passes ``index``'s events to ``server`` (None: drops them)."""

    def __init__(self, index: "DiskIndex", server: Optional[LookupServerInterface]):
        self._index = index
        self.server = server
        self._lock = threading.Lock()
        self.errors = 0        # lookup-server calls that raised

    def attach(self, server: Optional[LookupServerInterface]) -> None:
        """Attach (or detach) a lookup server; it hears of changes from then on."""
        self.server = server
        self._index.track_events(server is not None)

    def deliver(self) -> None:
        """Pass index inserts/removals to the lookup server, in order, outside the index lock.

        One thread at a time delivers; a caller that finds another delivering
        returns at once (that thread delivers its events too), so a slow
        lookup server never holds up a get or a put.
        """
        if self.server is None:
            self._index.drain_events()
            return
        while self._index.has_events():
            if not self._lock.acquire(blocking=False):
                return  # the holder re-checks for events after it lets go
            try:
                for op, key in self._index.drain_events():
                    try:
                        (self.server.insert if op == "insert" else self.server.remove)(key)
                    except Exception as e:  # advisory: never changes what is stored here
                        self.errors += 1
                        log.warning("lookup server %s of %s failed: %s", op, key.to_string(), e)
            finally:
                self._lock.release()
