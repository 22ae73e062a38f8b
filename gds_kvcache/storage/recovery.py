"""Start-up recovery of a disk index: which logged chunks it keeps when a directory reopens.

``recover_entries`` loads the index log's operations as columns, merges
them (``index_columns.merge_order``, under the hash the index's table uses,
so that table is built from the same sort) and keeps the entries that still
have their place: under the directory's current layout, inside
the pool files, page-aligned, and overlapping no other entry (where two
claim the same bytes only the newer, higher ``seq``, can own them).
Invariants: no two kept entries share a byte, none lies outside the files,
and a layout change that moves chunks keeps none of them. It writes
nothing; it only says whether the log must be replaced by a fresh snapshot
(``Recovered.rewrite``), which ``DiskIndex.recover`` then does under its own
state. NumPy passes over all entries, one sort by offset; Python runs only
for the entries in a run of overlapping extents.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..memory.extents import ExtentAllocator
from ..units import PAGE
from .entry import key_hash
from .entry_table import EntryTable
from .index_codec import BUILD_BLOCK, LEGACY_NAME, SNAP_NAME, Tables
from .index_columns import hex_strings, key_template, merge_order, new_key
from .index_decode import Ops
from .index_log import IndexLog
from .key_codes import KeyCodes, ident_homes
from .pool_file import PoolDirectory

__all__ = ["Recovered", "recover_entries", "restore", "same_layout", "resolve_extents", "trim_heap"]

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What an index keeps of its log on reopening."""

    ops: Ops                 # every usable operation of the files, in file order
    tables: Tables           # what their ids point into
    live: np.ndarray         # the indices of the puts kept, in put order (seq)
    packed: Optional[np.ndarray]   # ``merge_order``'s sorted words under ``ident_homes``
    starts: np.ndarray       # the kept extents' offsets, sorted (uint64)
    sizes: np.ndarray        # the sizes that go with ``starts``
    dropped: int             # records unusable, out of the pool or overlapped by a newer chunk
    rewrite: bool            # the log must be replaced by a snapshot of what is kept


def recover_entries(index_log: IndexLog, pool: PoolDirectory, capacity: int) -> Recovered:
    """Load ``index_log`` and keep what fits ``pool`` (``capacity`` pool bytes).

    Raises
    ------
    IndexFormatError
        The index is of a newer or foreign format (left untouched).
    """
    ops, tables, bad = index_log.load_ops()
    keep, packed = merge_order(ops, ident_homes)
    live = np.flatnonzero(keep)
    del keep
    old = pool.old_layout
    if old is not None and not same_layout(old, pool):
        live = live[:0]
    n = live.shape[0]
    ok, starts, sizes = resolve_extents(ops, tables, live, capacity, pool)
    if not ok.all():
        live = live[ok]
    seq = ops.seq if live.shape[0] == len(ops) else ops.seq[live]
    if live.shape[0] > 1 and not (seq[1:] >= seq[:-1]).all():
        live = live[np.argsort(seq, kind="stable")]
    del seq
    dropped = bad + n - live.shape[0]
    fresh = not os.path.exists(os.path.join(pool.path, SNAP_NAME))
    legacy = os.path.exists(os.path.join(pool.path, LEGACY_NAME))
    rewrite = bool(dropped or old is not None or fresh or legacy or index_log.records != live.shape[0])
    return Recovered(ops, tables, live, packed, starts, sizes, dropped, rewrite)


def restore(got: Recovered, space: ExtentAllocator, holes: dict[int, int], bind_checksums: bool) -> EntryTable:
    """The table of the entries ``got`` kept, with ``space`` rebuilt around them (their extents
    allocated and untracked, ``holes`` allocated). Takes ``got``'s arrays (it keeps only its counts).

    ``bind_checksums``: the entries were written before checksums were bound to their keys
    (``entry.keyed_checksum``): bind them, in memory.
    """
    table = EntryTable(KeyCodes(got.tables))
    table.load(got.ops, got.live, got.packed)
    space.rebuild_untracked(got.starts, got.sizes, dict(holes))
    got.ops = got.live = got.packed = got.starts = got.sizes = None   # the files' bytes and the load's columns
    trim_heap()
    if bind_checksums:
        n = len(table)
        for s in range(0, n, BUILD_BLOCK):
            rows = np.arange(s, min(n, s + BUILD_BLOCK))
            names = (k.to_string().encode() for k in table.keys(rows))
            table.csum[rows] ^= np.fromiter(map(key_hash, names), np.uint64, count=rows.shape[0])
    return table


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; elsewhere nothing).

    A load's temporary arrays of a few MiB come from the heap, not from their
    own mappings, and stay resident after they are freed (about 20 bytes a
    chunk at 1M chunks) unless trimmed once the load is done.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def same_layout(old: tuple[int, int, int], pool: PoolDirectory) -> bool:
    """Whether entries keep their place under this layout: the same file count and unit (a budget
    change) keeps every chunk still inside the files; a version-1 layout (unit 0) maps nothing."""
    files, _, unit = old
    return (files, unit) == (pool.stripes, pool.unit)


def resolve_extents(ops: Ops, tables: Tables, live: np.ndarray, capacity: int,
                    pool: PoolDirectory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which of the puts ``ops[live]`` lie in the pool and overlap no other (a mask over ``live``),
    and the extents kept, sorted by offset (offsets, sizes).

    Where two claim overlapping bytes only the newer (higher seq) can own them.
    """
    everything = live.shape[0] == len(ops)      # then live is 0..n-1: views, not gathers
    off = ops.offset if everything else ops.offset[live]
    phys = ops.phys if everything else ops.phys[live]
    end = off + phys
    keep = end <= np.uint64(capacity)
    if (off & np.uint64(PAGE - 1)).any():
        keep &= off % np.uint64(PAGE) == 0
    # Inside the files: all of the pool below the last row of stripe units is.
    inside = pool.stripe_bytes // pool.unit * pool.unit * pool.stripes
    for i in np.flatnonzero(keep & (end > np.uint64(inside))).tolist():
        keep[i] = pool.fits(int(off[i]), int(phys[i]))
    order = None                                # None: every one, in order (a pool filled in turn)
    if not keep.all() or not (off[1:] >= off[:-1]).all():
        idx = np.flatnonzero(keep)
        order = idx[_argsort_offsets(off[idx], capacity)]
    s, e = (off, end) if order is None else (off[order], end[order])
    if s.shape[0] > 1 and (s[1:] < e[:-1]).any():   # sorted: an overlap shows between neighbours
        order = np.arange(s.shape[0]) if order is None else order
        _settle_overlaps(ops, tables, live, order, keep)
        order = order[keep[order]]
    return keep, (off if order is None else off[order]), (phys if order is None else phys[order])


def _argsort_offsets(off: np.ndarray, capacity: int) -> np.ndarray:
    """The order of ``off`` (page-aligned, below ``capacity``): a sort of packed words where they fit."""
    m = off.shape[0]
    page_bits = max(1, (capacity // PAGE).bit_length())
    if m == 0 or page_bits + m.bit_length() > 64:
        return np.argsort(off, kind="stable")
    if (off[1:] >= off[:-1]).all():
        return np.arange(m)
    shift = np.uint64(m.bit_length())
    packed = (off // np.uint64(PAGE)) << shift | np.arange(m, dtype=np.uint64)
    packed.sort()
    return (packed & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)


def _settle_overlaps(ops: Ops, tables: Tables, live: np.ndarray, order: np.ndarray, keep: np.ndarray) -> None:
    """Clear ``keep`` of the losers among overlapping extents (``order``: positions in ``live`` of the
    kept ones, by offset)."""
    at = live[order]
    s, e = ops.offset[at], ops.offset[at] + ops.phys[at]
    # Runs of extents that overlap one another; no extent overlaps one of another run.
    new_run = np.ones(order.shape[0], bool)
    new_run[1:] = s[1:] >= np.maximum.accumulate(e)[:-1]
    starts = np.flatnonzero(new_run)
    stops = np.append(starts[1:], order.shape[0])
    for a, b in zip(starts.tolist(), stops.tolist()):
        if b - a < 2:
            continue
        kept: list[int] = []
        for i in order[a:b].tolist():
            j = int(live[i])
            if kept and int(ops.offset[live[kept[-1]]] + ops.phys[live[kept[-1]]]) > int(ops.offset[j]):
                loser = kept[-1] if ops.seq[live[kept[-1]]] < ops.seq[j] else i
                log.warning("dropping index entry %s: its extent overlaps a newer chunk's",
                            _key_string(ops, tables, int(live[loser])))
                keep[loser] = False
                if loser == i:
                    continue
                kept.pop()
            kept.append(i)


def _key_string(ops: Ops, tables: Tables, i: int) -> str:
    lo = ops.lo[i:i + 1] if ops.hi is None else np.concatenate([ops.hi[i:i + 1], ops.lo[i:i + 1]], axis=1)
    template = key_template(tables.prefixes[int(ops.prefix[i])].fields)
    return new_key(template, hex_strings(lo, ops.ndig[i:i + 1])[0]).to_string()
