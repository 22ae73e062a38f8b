"""``HolePuncher``: giving a pool directory's freed extents back to the file system.

A dropped chunk's extent is punched (``fallocate`` PUNCH_HOLE, size kept) so
a sparse pool shrinks on disk again. Invariants: nothing is punched until the
I/O engine is open and says punching is safe (``enabled``), and never in a
preallocated pool; callers punch an extent before they free it for reuse
(``DiskIndex.free``), never after. A pool file ``punch`` cannot open is
logged and skipped: the blocks stay allocated, the bytes stay correct.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from .pool_file import PoolDirectory, punch_hole

__all__ = ["HolePuncher"]

log = logging.getLogger(__name__)


class HolePuncher:
    """Punches logical pool extents of ``pool``; a no-op until ``enabled`` is set."""

    def __init__(self, pool: PoolDirectory):
        self._pool = pool
        #: Set once the I/O engine is open: ``not preallocate and engine.punch_ok``.
        self.enabled = False

    def punch_free(self, free: Iterable[tuple[int, int]]) -> None:
        """Give blocks of interrupted writes back to the file system (unless preallocated)."""
        if not self.enabled:
            return
        fds = [os.open(p, os.O_RDWR) for p in self._pool.pool_paths]
        try:
            for start, size in free:
                for f, local, _, n in self._pool.pieces(start, size):
                    punch_hole(fds[f], local, n)
        finally:
            for fd in fds:
                os.close(fd)

    def punch(self, offset: int, size: int) -> None:
        """Give logical ``[offset, +size)`` back to the file system (before it is freed)."""
        if not self.enabled:
            return
        for f, local, _, n in self._pool.pieces(offset, size):
            path = self._pool.pool_paths[f]
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                log.warning("cannot punch %s: %s", path, e)
                return
            try:
                punch_hole(fd, local, n)
            finally:
                os.close(fd)
