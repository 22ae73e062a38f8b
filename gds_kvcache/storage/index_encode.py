"""Encoding ``DiskEntry`` objects as index records: a log batch's, or a whole snapshot body.

The byte layout is described in ``index_codec`` (and only there); this module
turns entries into sealed slots of that layout: a log batch
(:func:`encode_batch`) or a snapshot body (:func:`encode_snapshot`).

Invariants: every entry passes :func:`check_entry` before any slot is made
of it (an append's batch is checked whole by :func:`check_batch`), so
nothing that ``index_decode`` would refuse is written; a table entry comes
ahead of the first record that names its id, in the same write; a
snapshot's records follow its tables, in ``seq`` order.
"""

from __future__ import annotations

import gc
from operator import attrgetter
from typing import Optional, Sequence

import numpy as np

from ..errors import GdsKvCacheError
from ..key import CacheEngineKey
from ..units import PAGE
from .entry import DiskEntry, IndexEntryError
from .index_codec import (BUILD_BLOCK, CONT, DEF_LAYOUT, DEF_PREFIX, DEL, DEL_WIDE, MAX_OFFSET, MAX_PHYS_SIZE,
                          MAX_U64, NARROW, OFF_BITS, PUT, PUT_WIDE, REC, SLOT_DTYPE, Layout, Tables, def_slots,
                          def_span, layout_payload, prefix_payload, seal)
from .index_columns import EntryColumns
from .index_decode import Ops

__all__ = ["FileTables", "check_batch", "check_entry", "columns_of", "encode_batch", "encode_columns", "encode_record",
           "encode_snapshot"]

_KEY = attrgetter("key")
_PREFIX = attrgetter("fmt", "model_name", "world_size", "worker_id")
_LAYOUT = attrgetter("shape", "dtype", "fmt")
_HASH = attrgetter("chunk_hash")
_OFFSET, _PHYS, _NBYTES = attrgetter("offset"), attrgetter("phys_size"), attrgetter("nbytes")
_CSUM, _SEQ = attrgetter("checksum"), attrgetter("seq")


# -- records ------------------------------------------------------------------------------
def encode_record(buf: bytearray, put: bool, h: str, pid: int, lid: int, off: int, phys: int, seq: int,
                  csum: int) -> None:
    """Append the slot(s) of one put or delete to ``buf`` (checks left 0 for :func:`~.index_codec.seal`)."""
    ext = off // PAGE | (phys // PAGE) << OFF_BITS
    if len(h) <= NARROW:
        buf += REC.pack(PUT if put else DEL, len(h), 1, 0, pid, lid, ext, seq, csum,
                         int(h, 16).to_bytes(16, "big"))
    else:
        raw = int(h, 16).to_bytes(32, "big")
        buf += REC.pack(PUT_WIDE if put else DEL_WIDE, len(h), 2, 0, pid, lid, ext, seq, csum, raw[16:])
        buf += REC.pack(CONT, 0, 1, 0, 0, 0, 0, 0, 0, raw[:16])


def check_entry(e: DiskEntry, valid_layouts: dict[tuple, Layout]) -> tuple:
    """Validate one entry for writing; return its normalised layout tuple.

    ``valid_layouts`` caches the layouts validated so far (this adds to it).
    """
    k = e.key
    if not isinstance(k, CacheEngineKey):
        raise IndexEntryError(f"an entry's key must be a CacheEngineKey, got {type(k).__name__}")
    try:
        lay = (tuple(e.shape), e.dtype, e.fmt)
        v = valid_layouts.get(lay)
        if v is None:
            v = valid_layouts[lay] = Layout(lay)
    except (GdsKvCacheError, ValueError, TypeError) as exc:
        raise IndexEntryError(f"entry {k.to_string()}: {exc}") from None
    if e.nbytes != v.nbytes:
        raise IndexEntryError(f"entry {k.to_string()}: nbytes {e.nbytes!r} is not the {v.nbytes} "
                              f"that shape {v.shape} of {v.dtype} takes")
    if not (isinstance(e.phys_size, int) and e.nbytes <= e.phys_size <= MAX_PHYS_SIZE and e.phys_size % PAGE == 0):
        raise IndexEntryError(f"entry {k.to_string()}: phys_size {e.phys_size!r} must be a multiple of "
                              f"{PAGE} from nbytes ({e.nbytes}) up to {MAX_PHYS_SIZE}")
    if not (isinstance(e.offset, int) and 0 <= e.offset <= MAX_OFFSET and e.offset % PAGE == 0):
        raise IndexEntryError(f"entry {k.to_string()}: offset {e.offset!r} must be a multiple of {PAGE} "
                              f"from 0 up to {MAX_OFFSET}")
    if not (isinstance(e.checksum, int) and 0 <= e.checksum <= MAX_U64):
        raise IndexEntryError(f"entry {k.to_string()}: checksum {e.checksum!r} is not a 64-bit unsigned int")
    return (v.shape, v.dtype, v.fmt)


def encode_snapshot(entries, valid_layouts: dict[tuple, Layout],
                    table_slots: dict[tuple, int]) -> tuple[list, int]:
    """The snapshot body (tables, then records in ``seq`` order) and the largest seq.

    ``entries`` is a list of ``DiskEntry`` or an ``EntryColumns``; either
    way the same bytes come out (the list is made into columns first).
    Validates every entry before anything is written. ``valid_layouts`` is
    :func:`check_entry`'s cache; ``table_slots`` gets the slots of each
    table entry written.

    Notes
    -----
    Every per-entry step is a ``map`` of an ``attrgetter``, a dict lookup
    or a NumPy pass, so its loop runs in C; Python code runs once per
    distinct key prefix or layout.
    """
    was_enabled = gc.isenabled()
    gc.disable()   # the per-entry tuples would set off collections that rescan every entry
    try:
        cols = entries if isinstance(entries, EntryColumns) else columns_of(entries, valid_layouts)
        return encode_columns(cols, valid_layouts, table_slots)
    finally:
        if was_enabled:
            gc.enable()


def columns_of(entries: list[DiskEntry], valid_layouts: dict[tuple, Layout]) -> EntryColumns:
    """``entries`` as columns (in the same order), each checked as :func:`check_entry` would.

    Prefix and layout ids are given in order of first appearance.
    """
    n = len(entries)
    keys = list(map(_KEY, entries))
    if not all(issubclass(t, CacheEngineKey) for t in set(map(type, keys))):
        raise IndexEntryError("every entry's key must be a CacheEngineKey")
    tables = Tables()
    prefixes = list(map(_PREFIX, keys))
    prefix_ids = {f: tables.prefix(f) for f in dict.fromkeys(prefixes)}
    if min(prefix_ids.values(), default=0) < 0:
        raise IndexEntryError(f"a key prefix cannot be recorded: {min(prefix_ids, key=prefix_ids.get)!r}")
    ops = Ops(0, wide=False)
    ops.prefix = np.fromiter(map(prefix_ids.__getitem__, prefixes), np.int64, count=n)
    given = list(map(_LAYOUT, entries))          # shape may be a torch.Size or a list
    try:
        sample = dict(zip(given, entries))       # one entry of each distinct layout
    except TypeError:                            # an unhashable shape (a list): normalise first
        given = [(tuple(s), d, f) for s, d, f in given]
        sample = dict(zip(given, entries))
    given_ids: dict[tuple, int] = {}
    for g, e in sample.items():
        lay = check_entry(e, valid_layouts)      # the layout once; every extent is checked below
        given_ids[g] = tables.layout(lay)
    ops.layout = np.fromiter(map(given_ids.__getitem__, given), np.int64, count=n)

    def column(get, name: str) -> np.ndarray:
        try:
            return np.fromiter(map(get, entries), np.uint64, count=n)
        except (OverflowError, TypeError, ValueError):
            raise IndexEntryError(f"an entry's {name} is not a 64-bit unsigned int") from None

    ops.offset = column(_OFFSET, "offset")
    ops.phys = column(_PHYS, "phys_size")
    nbytes = column(_NBYTES, "nbytes")
    ops.csum = column(_CSUM, "checksum")
    ops.seq = column(_SEQ, "seq")
    ops.is_put = np.ones(n, bool)
    wrong = (nbytes != _layout_nbytes(tables)[ops.layout]) | (ops.phys < nbytes) | _bad_extents(ops)
    if wrong.any():
        check_entry(entries[int(np.flatnonzero(wrong)[0])], valid_layouts)   # raises, naming the entry
    hashes = list(map(_HASH, keys))
    ops.ndig = np.fromiter(map(len, hashes), np.uint8, count=n)
    if (ops.ndig == NARROW).all():
        ops.lo = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(n, 16)
    else:
        both = np.frombuffer(b"".join(int(h, 16).to_bytes(32, "big") for h in hashes), np.uint8).reshape(n, 32)
        ops.lo = both[:, 16:]
        ops.hi = both[:, :16] if (ops.ndig > NARROW).any() else None
    return EntryColumns(ops, tables)


def _layout_nbytes(tables: Tables) -> np.ndarray:
    return np.array([min(v.nbytes, MAX_U64) for v in tables.layouts] + [0], np.uint64)


def _bad_extents(ops: Ops) -> np.ndarray:
    page = np.uint64(PAGE)
    phys, offset = ops.phys, ops.offset
    return ((phys % page != 0) | (phys > np.uint64(MAX_PHYS_SIZE)) | (offset % page != 0)
            | (offset > np.uint64(MAX_OFFSET)))


def _first_appearance(ids: np.ndarray) -> np.ndarray:
    """The distinct values of ``ids`` (small ints >= 0) in order of first appearance."""
    n = ids.shape[0]
    if n == 0:
        return ids[:0]
    first = np.full(int(ids.max()) + 1, n, np.int64)
    np.minimum.at(first, ids, np.arange(n, dtype=np.int64))
    vals = np.flatnonzero(first < n)
    return vals[np.argsort(first[vals])]


def encode_columns(cols: EntryColumns, valid_layouts: dict[tuple, Layout],
                   table_slots: dict[tuple, int]) -> tuple[list, int]:
    """The snapshot body of ``cols`` (tables, then records in ``seq`` order) and the largest seq.

    File ids are given in order of first appearance in ``cols``. Raises
    ``IndexEntryError`` (nothing written) for an impossible extent.
    """
    ops, tables = cols.ops, cols.tables
    n = len(ops)
    lay_nbytes = _layout_nbytes(tables)
    if n and ((ops.phys < lay_nbytes[ops.layout]) | _bad_extents(ops)).any():
        raise IndexEntryError("an entry's extent is not a page-aligned one that holds its layout's bytes")
    porder = _first_appearance(ops.prefix)
    lorder = _first_appearance(ops.layout)
    pid = np.zeros(len(tables.prefixes) + 1, np.uint32)
    pid[porder] = np.arange(porder.shape[0], dtype=np.uint32)
    lid = np.zeros(len(tables.layouts) + 1, np.uint32)
    lid[lorder] = np.arange(lorder.shape[0], dtype=np.uint32)
    pid, lid = pid[ops.prefix], lid[ops.layout]
    ndig = ops.ndig
    is_wide = ndig > NARROW
    lo, hi = ops.lo, ops.hi
    seq = ops.seq
    order = np.argsort(seq, kind="stable")

    tables_buf = bytearray()
    for q, g in enumerate(porder.tolist()):
        fields = tables.prefixes[g].fields
        payload = prefix_payload(fields)
        tables_buf += def_slots(DEF_PREFIX, q, payload)
        table_slots[fields] = def_span(payload)
    for q, g in enumerate(lorder.tolist()):
        v = tables.layouts[g]
        lay = (v.shape, v.dtype, v.fmt)
        valid_layouts.setdefault(lay, v)
        payload = layout_payload(lay)
        tables_buf += def_slots(DEF_LAYOUT, q, payload)
        table_slots[lay] = def_span(payload)
    blocks: list = []
    if tables_buf:
        seal(tables_buf)
        blocks.append(tables_buf)
    page = np.uint64(PAGE)
    for s in range(0, n, 4 * BUILD_BLOCK):
        o = order[s:s + 4 * BUILD_BLOCK]
        w = is_wide[o]
        # Slot of each entry: one each, two for a wide hash.
        pos = np.arange(o.shape[0]) + np.concatenate([[0], np.cumsum(w)[:-1]]).astype(np.int64)
        rows = np.zeros(o.shape[0] + int(np.count_nonzero(w)), SLOT_DTYPE)
        r = rows[pos] if w.any() else rows
        r["tag"] = np.where(w, PUT_WIDE, PUT)
        r["ndig"] = ndig[o]
        r["span"] = np.where(w, 2, 1)
        r["prefix"] = pid[o]
        r["layout"] = lid[o]
        r["ext"] = ops.offset[o] // page | (ops.phys[o] // page) << np.uint64(OFF_BITS)
        r["seq"] = seq[o]
        r["csum"] = ops.csum[o]
        r["hash"] = lo[o]
        if w.any():
            rows[pos] = r
            cont = pos[w] + 1
            rows["tag"][cont] = CONT
            rows["span"][cont] = 1
            rows["hash"][cont] = hi[o[w]]
        seal(rows)
        blocks.append(rows.view(np.uint8))
    return blocks, int(seq.max()) if n else 0


# -- a log batch ---------------------------------------------------------------------------
class FileTables:
    """The interning tables of the log being appended to: the id of each key prefix and layout there.

    Ids are per file: a new log starts with none, and the first record that
    names a prefix or layout is preceded, in the same write, by its table entry.
    """

    __slots__ = ("prefix_ids", "layout_ids", "next_prefix", "next_layout")

    def __init__(self, prefix_ids: Optional[dict] = None, layout_ids: Optional[dict] = None, next_prefix: int = 0,
                 next_layout: int = 0):
        self.prefix_ids: dict[tuple, int] = {} if prefix_ids is None else prefix_ids
        self.layout_ids: dict[tuple, int] = {} if layout_ids is None else layout_ids
        self.next_prefix = next_prefix
        self.next_layout = next_layout

    def copy(self) -> "FileTables":
        return FileTables(dict(self.prefix_ids), dict(self.layout_ids), self.next_prefix, self.next_layout)

    def prefix_id(self, k: CacheEngineKey, buf: bytearray, table_slots: dict[tuple, int]) -> int:
        fields = (k.fmt, k.model_name, k.world_size, k.worker_id)
        i = self.prefix_ids.get(fields)
        if i is None:
            i = self.prefix_ids[fields] = self.next_prefix
            self.next_prefix += 1
            payload = prefix_payload(fields)
            buf += def_slots(DEF_PREFIX, i, payload)
            table_slots[fields] = def_span(payload)
        return i

    def layout_id(self, lay: tuple, buf: bytearray, table_slots: dict[tuple, int]) -> int:
        i = self.layout_ids.get(lay)
        if i is None:
            i = self.layout_ids[lay] = self.next_layout
            self.next_layout += 1
            payload = layout_payload(lay)
            buf += def_slots(DEF_LAYOUT, i, payload)
            table_slots[lay] = def_span(payload)
        return i


def check_batch(puts: Sequence[DiskEntry], dels: Sequence[CacheEngineKey],
                valid_layouts: dict[tuple, Layout]) -> list[tuple]:
    """Validate one append's entries and keys (:class:`IndexEntryError`); return the puts' layouts."""
    lays = [check_entry(e, valid_layouts) for e in puts]
    for k in dels:
        if not isinstance(k, CacheEngineKey):
            raise IndexEntryError(f"dels must hold CacheEngineKey objects, got {type(k).__name__}")
    return lays


def encode_batch(tables: FileTables, puts: Sequence[DiskEntry], lays: Sequence[tuple],
                 dels: Sequence[CacheEngineKey], seq: int, table_slots: dict[tuple, int]) -> tuple[bytearray, int]:
    """One append's slots, sealed, and the last seq it used.

    ``puts`` (checked; ``lays`` their layouts, as :func:`check_batch` gives
    them), then ``dels``, get seq ``seq + 1``, ``seq + 2``... New table
    entries go in ``tables`` (which this changes) and ``table_slots``.
    """
    buf = bytearray()
    for e, lay in zip(puts, lays):
        pid = tables.prefix_id(e.key, buf, table_slots)
        lid = tables.layout_id(lay, buf, table_slots)
        seq += 1
        encode_record(buf, True, e.key.chunk_hash, pid, lid, e.offset, e.phys_size, seq, e.checksum)
    for k in dels:
        seq += 1
        encode_record(buf, False, k.chunk_hash, tables.prefix_id(k, buf, table_slots), 0, 0, 0, seq, 0)
    seal(buf)
    return buf, seq
