"""Start-up recovery of a disk index: which logged chunks it keeps when a directory reopens.

``recover_entries`` loads the index log and keeps the entries that still
have their place: under the directory's current layout, inside the pool
files, page-aligned, and overlapping no other entry (where two claim the
same bytes only the newer, higher ``seq``, can own them). Invariants: no two
kept entries share a byte, none lies outside the files, and a layout change
that moves chunks keeps none of them. It writes nothing; it only says
whether the log must be replaced by a fresh snapshot (``Recovered.rewrite``),
which ``DiskIndex.recover`` then does under its own state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..units import PAGE
from .entry import DiskEntry
from .index_codec import LEGACY_NAME, SNAP_NAME
from .index_log import IndexLog
from .pool_file import PoolDirectory

__all__ = ["Recovered", "recover_entries", "same_layout", "resolve_extents"]

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What an index keeps of its log on reopening."""

    entries: list      # the DiskEntry kept, in put order (seq)
    dropped: int       # records unusable, out of the pool or overlapped by a newer chunk
    rewrite: bool      # the log must be replaced by a snapshot of ``entries``


def recover_entries(index_log: IndexLog, pool: PoolDirectory, capacity: int) -> Recovered:
    """Load ``index_log`` and keep what fits ``pool`` (``capacity`` pool bytes).

    Raises
    ------
    IndexFormatError
        The index is of a newer or foreign format (left untouched).
    """
    entries, bad = index_log.load()
    old = pool.old_layout
    if old is not None:
        entries = same_layout(entries, old, pool)
    kept = resolve_extents(entries, capacity, pool)
    dropped = bad + len(entries) - len(kept)
    kept.sort(key=lambda e: e.seq)
    fresh = not os.path.exists(os.path.join(pool.path, SNAP_NAME))
    legacy = os.path.exists(os.path.join(pool.path, LEGACY_NAME))
    rewrite = bool(dropped or old is not None or fresh or legacy or index_log.records != len(kept))
    return Recovered(kept, dropped, rewrite)


def same_layout(entries: list[DiskEntry], old: tuple[int, int, int], pool: PoolDirectory) -> list[DiskEntry]:
    """Entries that keep their place under this layout: the same file count and unit (a budget
    change) keeps every chunk still inside the files; a version-1 layout (unit 0) maps nothing."""
    files, _, unit = old
    if (files, unit) != (pool.stripes, pool.unit):
        return []
    return entries


def resolve_extents(entries: list[DiskEntry], capacity: int, pool: PoolDirectory) -> list[DiskEntry]:
    """Entries whose extents lie in the pool and overlap no other, in one sweep by offset.

    Where two claim overlapping bytes only the newer (higher seq) can own them.
    """
    kept: list[DiskEntry] = []
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset % PAGE or e.offset + e.phys_size > capacity or not pool.fits(e.offset, e.phys_size):
            continue
        if kept and kept[-1].offset + kept[-1].phys_size > e.offset:
            loser = kept[-1] if kept[-1].seq < e.seq else e
            log.warning("dropping index entry %s: its extent overlaps a newer chunk's", loser.key.to_string())
            if loser is e:
                continue
            kept.pop()
        kept.append(e)
    return kept
