"""``LogReserve``: the index files kept within their share of the disk budget.

The disk budget sets ``reserve`` bytes aside for the index files
(``pool_file.index_reserve``). The directory's other files (layout, lock)
take ``OTHER_FILES`` of it, and the log may use half of the rest: during a
compaction the old log and the new snapshot coexist for a moment. This
module holds that arithmetic and the log's preallocation. Invariants: a
``snapshot`` is followed by preallocating the log's blocks up to the budget,
so an append never meets a full file system; nothing here locks or decides
what to evict (``DiskIndex`` calls it under its lock and evicts).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Iterable

from ..units import PAGE
from .entry import DiskEntry
from .index_log import IndexLog
from .pool_file import preallocate_keep_size

__all__ = ["LogReserve", "OTHER_FILES"]

log = logging.getLogger(__name__)

#: Files of the directory besides pool and index (layout, lock), in blocks the
#: budget must leave room for.
OTHER_FILES = 2 * PAGE


class LogReserve:
    """The budget of ``index_log`` out of a ``reserve`` of disk bytes."""

    def __init__(self, index_log: IndexLog, reserve: int):
        self._log = index_log
        #: Bytes the log may take (two snapshots coexist for a moment during compaction, hence half).
        self.budget = (reserve - OTHER_FILES) // 2

    def has_room(self, adding: int) -> bool:
        """Whether the log as it is takes ``adding`` more put records (else compact first)."""
        return self._log.bytes + IndexLog.size_of(adding) + IndexLog.size_of(1) <= self.budget

    def fits(self, live: int) -> bool:
        """Whether a snapshot of ``live`` entries, and a record after it, fits the budget."""
        return IndexLog.size_of(live) + IndexLog.size_of(1) <= self.budget

    def excess(self, live: int, adding: int) -> int:
        """How many of ``live`` chunks must go so that, with ``adding`` more, the index fits."""
        if self.fits(live + adding):
            return 0
        lo, hi = 0, live           # the most chunks that may stay: lo fits (or is 0), hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(mid + adding):
                lo = mid
            else:
                hi = mid - 1
        return live - lo

    def snapshot(self, entries: Iterable[DiskEntry]) -> None:
        """Rewrite the index as a snapshot of ``entries``, then give the log its blocks."""
        self._log.snapshot(entries)
        self.preallocate()

    def compact_at_close(self, entries: Iterable[DiskEntry], where: str) -> None:
        """Snapshot ``entries`` if the file system has room; on a full one leave the log as it is.

        Compaction is an optimisation: the log holds every record and the next
        open reads it as well, so a full file system never makes a close fail.
        """
        try:
            self._log.snapshot(entries)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("index of %s: no room to compact it at close (%s); its log stays as it is",
                        where, e.strerror or e)
            try:
                os.unlink(self._log.snap_path + ".tmp")
            except FileNotFoundError:
                pass

    def preallocate(self) -> None:
        # Give the log its blocks now (within the index reserve), so an
        # append never meets a full file system: the put that needs it has
        # its bytes written already, and failing it then would waste them.
        room = self.budget - self._log.bytes
        if room > 0 and not preallocate_keep_size(self._log.log_path, room):
            log.debug("could not preallocate %d bytes for %s", room, self._log.log_path)
