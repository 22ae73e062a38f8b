"""Tombstones: a dropped chunk's extent made unreadable in place, and recognisable as such.

A shared directory's writer that drops a chunk while some other index (Redis)
may still list it overwrites the first page of the chunk's extent with
``TOMBSTONE``. Any reader that still finds the old entry then fails its
checksum (the page is not the chunk's bytes, whatever its key), so the removed
version is never served; and the reader can tell this miss from corruption
(``is_tombstone``). Unlike hole punching this works in preallocated pools and
under a mapped engine, whose pinned pages a punch would detach from the file.

Invariants: a tombstone is written only into an extent that no longer holds a
live chunk of its owner (the entry was dropped from the owner's index first)
and that is not reused until the owner frees it; it is one page at the
extent's start (extents are page-aligned, at least one page long), written
through the page cache, which every reader of the file (buffered, O_DIRECT,
or a shared mapping) sees.
"""

from __future__ import annotations

import os

from ..units import PAGE
from .pool_layout import PoolLayout

__all__ = ["MAGIC", "TOMBSTONE", "is_tombstone", "write_tombstone"]

MAGIC = b"gds_kvcache:removed-chunk\x00"
#: One page: the magic, then zeros (no chunk's checksum can match it by design of the key binding).
TOMBSTONE = MAGIC + bytes(PAGE - len(MAGIC))


def _first_page(layout: PoolLayout, offset: int) -> tuple[str, int]:
    f, local, _, _ = layout.pieces(offset, PAGE)[0]
    return layout.pool_paths[f], local


def write_tombstone(layout: PoolLayout, offset: int) -> None:
    """Overwrite the first page of the extent at logical ``offset`` with ``TOMBSTONE``.

    Raises ``OSError`` if the pool file cannot be written (the caller decides
    whether the drop may proceed without it).
    """
    path, local = _first_page(layout, offset)
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.pwrite(fd, TOMBSTONE, local) != PAGE:
            raise OSError(f"short tombstone write to {path!r} at {local}")
    finally:
        os.close(fd)


def is_tombstone(layout: PoolLayout, offset: int) -> bool:
    """Whether the extent at logical ``offset`` starts with a tombstone (False if unreadable)."""
    try:
        path, local = _first_page(layout, offset)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, len(MAGIC), local) == MAGIC
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return False
