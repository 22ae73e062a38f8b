"""Decoding the disk index's binary files in bulk: slots -> operations (``Ops``, one column per field).

The format is described in ``index_codec`` (and only there). :func:`parse_slots`
checks and decodes one file's slots into an :class:`Ops` (operations in file
order) in a few NumPy passes over all records, with Python running once per
table entry; ``index_columns`` merges them into the live entries and makes
objects of those where asked.

Invariants: decoding never raises on a file's slots (its header is checked
first, by ``index_codec.parse_header``): a slot that fails its check, a
record naming an unusable table entry or an impossible value, and a torn
tail are each skipped and counted once as unusable.
"""

from __future__ import annotations

import logging
import struct
from typing import Optional

import numpy as np

from ..key import MAX_KEY_STRING
from ..units import PAGE
from .index_codec import (CONT, CONT_HEAD, DEF_HEAD, DEF_LAYOUT, DEF_PREFIX, DEL, DEL_WIDE, MAX_U64, NARROW,
                          OFF_BITS, PUT, PUT_WIDE, SLOT, SLOT_DTYPE, Tables, parse_layout, parse_prefix, slot_checks,
                          slot_words)

__all__ = ["Ops", "parse_slots"]

log = logging.getLogger(__name__)

_SPLIT_BLOCK = 1 << 15          # slots a block of ``_split`` (1.8 MiB: stays in cache)
# The slot layout with the hash as one 16-byte item (copied as one, not as 16 bytes).
_SPLIT_DTYPE = np.dtype([(f, "V16" if f == "hash" else SLOT_DTYPE[f]) for f in SLOT_DTYPE.names])
assert _SPLIT_DTYPE.itemsize == SLOT


# -- decoded operations ----------------------------------------------------------------
class Ops:
    """Put/delete operations in file order, as columns (ids are global)."""

    __slots__ = ("is_put", "prefix", "ndig", "lo", "hi", "layout", "phys", "offset", "seq", "csum")

    def __init__(self, n: int = 0, wide: bool = False):
        self.is_put = np.zeros(n, bool)
        self.prefix = np.zeros(n, np.int64)
        self.ndig = np.zeros(n, np.uint8)
        self.lo = np.zeros((n, 16), np.uint8)                        # low 128 bits of the hash, big-endian
        self.hi = np.zeros((n, 16), np.uint8) if wide else None      # high 128 bits, where any hash is wide
        self.layout = np.zeros(n, np.int64)                          # -1 for deletes
        self.phys = np.zeros(n, np.uint64)                           # bytes
        self.offset = np.zeros(n, np.uint64)                         # bytes
        self.seq = np.zeros(n, np.uint64)
        self.csum = np.zeros(n, np.uint64)

    def __len__(self) -> int:
        return self.is_put.shape[0]

    def take(self, idx: np.ndarray) -> "Ops":
        """The operations at ``idx`` (indices or a mask), copied."""
        o = Ops.__new__(Ops)
        for f in Ops.__slots__:
            v = getattr(self, f)
            if v is not None and v.ndim == 2:
                # One 16-byte item a row rather than 16 one-byte items (the rows may be strided).
                v = v.view(f"V{v.shape[1]}")[:, 0][idx].view(np.uint8).reshape(-1, v.shape[1])
            elif v is not None:
                v = v[idx]
            setattr(o, f, v)
        return o

    @staticmethod
    def concat(parts: list["Ops"]) -> "Ops":
        parts = [p for p in parts if len(p)] or [Ops()]
        if len(parts) == 1:
            return parts[0]
        o = Ops.__new__(Ops)
        wide = any(p.hi is not None for p in parts)
        for f in Ops.__slots__:
            if f == "hi":
                o.hi = np.concatenate([p.hi if p.hi is not None else np.zeros((len(p), 16), np.uint8)
                                       for p in parts]) if wide else None
            else:
                setattr(o, f, np.concatenate([getattr(p, f) for p in parts]))
        return o


def _leading_zero_nibbles(b: np.ndarray) -> np.ndarray:
    """Leading zero hex digits of each row of big-endian bytes ``b`` (``(n, m)`` uint8)."""
    nib = np.empty((b.shape[0], 2 * b.shape[1]), np.uint8)
    nib[:, 0::2] = b >> 4
    nib[:, 1::2] = b & 15
    nz = nib != 0
    return np.where(nz.any(axis=1), nz.argmax(axis=1), nib.shape[1])


# -- one file's slots ------------------------------------------------------------
def _split(body) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each field of ``body``'s slots as a contiguous column, and which slots pass their check.

    One pass over the slots, a cache-sized block at a time: the NumPy passes
    after it then read a few bytes a slot, not a whole 56-byte slot each.
    """
    rows = np.frombuffer(body, _SPLIT_DTYPE)
    words = slot_words(body)
    n = rows.shape[0]
    cols = {f: np.empty(n, _SPLIT_DTYPE[f]) for f in _SPLIT_DTYPE.names}
    ok = np.empty(n, bool)
    for s in range(0, n, _SPLIT_BLOCK):
        r = rows[s:s + _SPLIT_BLOCK]
        for f, c in cols.items():
            c[s:s + r.shape[0]] = r[f]
        ok[s:s + r.shape[0]] = slot_checks(words[s:s + _SPLIT_BLOCK]) == cols["check"][s:s + r.shape[0]]
    cols["hash"] = cols["hash"].view(np.uint8).reshape(n, 16)
    return cols, ok


def parse_slots(buf: bytes, tables: Tables) -> tuple[Ops, int, tuple]:
    """Decode one binary file (header already checked) into operations.

    Returns the valid operations, the count of unusable records, and
    the file's own tables: (prefix ids, layout ids, next free prefix id,
    next free layout id, the file's length without its torn tail).

    Notes
    -----
    Each lost record counts once: a slot failing its check, an intact
    record or table entry that cannot be used, and the torn tail (a
    partial slot, or a record whose later slots are past the end).
    """
    whole = (len(buf) - SLOT) // SLOT
    torn = (len(buf) - SLOT) % SLOT != 0
    end = whole                   # slots before the torn tail, if any
    bad = 0
    body = memoryview(buf)[SLOT:SLOT + whole * SLOT]     # no copy
    rows, ok = _split(body)
    bad += int(whole - np.count_nonzero(ok))
    tag = rows["tag"]
    span = rows["span"]

    # Table entries: few, decoded one by one.
    local_prefix: dict[int, int] = {}   # id in this file -> global id (-1: unusable)
    local_layout: dict[int, int] = {}
    prefix_ids: dict[tuple, int] = {}
    layout_ids: dict[tuple, int] = {}
    max_prefix = max_layout = -1
    for i in np.flatnonzero(ok & ((tag == DEF_PREFIX) | (tag == DEF_LAYOUT))).tolist():
        ident = int(rows["prefix"][i])
        is_prefix = tag[i] == DEF_PREFIX
        if is_prefix:
            max_prefix = max(max_prefix, ident)
        else:
            max_layout = max(max_layout, ident)
        payload = _gather(body, ok, tag, span, i)
        if payload is None:
            if i + int(span[i]) > whole:
                torn = True       # the write of this entry was cut short
                end = min(end, i)
            elif all(ok[i:i + int(span[i])]):
                bad += 1          # else a slot of it failed its check and is counted already
            continue
        try:
            fields = parse_prefix(payload) if is_prefix else parse_layout(payload)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            log.warning("index table entry at slot %d unusable (%s)", i + 1, e)
            bad += 1
            continue
        g = tables.prefix(fields) if is_prefix else tables.layout(fields)
        target = local_prefix if is_prefix else local_layout
        if target.get(ident, g) != g:
            g = -1    # one id, two meanings: trust neither
        target[ident] = g
        (prefix_ids if is_prefix else layout_ids)[fields] = ident

    narrow = ok & (tag == PUT) & (span == 1)
    n_defs = len(local_prefix) + len(local_layout)
    if np.count_nonzero(narrow) + n_defs == whole and n_defs == np.count_nonzero(ok & (span == 1) & (
            (tag == DEF_PREFIX) | (tag == DEF_LAYOUT))):
        # The usual snapshot: one-slot table entries and one-slot puts, all intact.
        is_rec = narrow
        wide_head = np.zeros_like(ok)
    else:
        is_narrow = (tag == PUT) | (tag == DEL)
        is_wide_tag = (tag == PUT_WIDE) | (tag == DEL_WIDE)
        is_rec = ok & (is_narrow | is_wide_tag)
        narrow = is_rec & is_narrow & (span == 1)
        wide_head = is_rec & is_wide_tag & (span == 2)
        bad += int(np.count_nonzero(is_rec & ~narrow & ~wide_head))     # a wrong span
        other = ok & ~is_rec & (tag != DEF_PREFIX) & (tag != DEF_LAYOUT) & (tag != CONT)
        bad += int(np.count_nonzero(other))     # intact, but no record, table entry or continuation
    if wide_head.any():
        cont = np.zeros_like(ok)
        cont[:-1] = ok[1:] & (tag[1:] == CONT) & (span[1:] == 1)
        if wide_head[-1]:
            torn = True                    # its second slot is past the end
            end = min(end, whole - 1)
            wide_head[-1] = False
        # A second slot that failed its check is counted already; an intact wrong one is not.
        nxt_ok = np.zeros_like(ok)
        nxt_ok[:-1] = ok[1:]
        bad += int(np.count_nonzero(wide_head & ~cont & nxt_ok))
        wide_head &= cont
    usable = narrow | wide_head
    # Ids that intact records use count as taken even where their table
    # entry was lost, so appends never give them a second meaning.
    max_prefix = max(max_prefix, int(rows["prefix"][is_rec].max(initial=0)))
    max_layout = max(max_layout, int(rows["layout"][is_rec].max(initial=0)))

    nuse = int(np.count_nonzero(usable))
    first = int(np.argmax(usable)) if nuse else 0
    if nuse and usable[first:first + nuse].all():
        idx = slice(first, first + nuse)        # the usual file: tables, then only records; no copy
        at = np.arange(first, first + nuse) if wide_head.any() else None
    else:
        idx = at = np.flatnonzero(usable)
    r = {f: c[idx] for f, c in rows.items()}
    is_wide = wide_head[idx]
    ops = Ops(0, wide=bool(is_wide.any()))
    if ops.hi is not None:
        ops.hi = np.zeros((nuse, 16), np.uint8)
        ops.hi[is_wide] = rows["hash"][at[is_wide] + 1]
    t = r["tag"]
    ops.is_put = (t == PUT) | (t == PUT_WIDE)
    pmap = np.full(max(local_prefix, default=-1) + 2, -1, np.int64)   # last entry: "no such id"
    for k, g in local_prefix.items():
        pmap[k] = g
    lmap = np.full(max(local_layout, default=-1) + 2, -1, np.int64)
    for k, g in local_layout.items():
        lmap[k] = g
    ops.prefix = _mapped(pmap, r["prefix"])
    ops.layout = _mapped(lmap, r["layout"])
    if not ops.is_put.all():
        ops.layout[~ops.is_put] = -1
    ops.ndig = r["ndig"]
    ops.lo = r["hash"]
    ext = r["ext"]
    ops.offset = ext & np.uint64((1 << OFF_BITS) - 1)
    ops.offset *= np.uint64(PAGE)
    ops.phys = ext >> np.uint64(OFF_BITS)
    ops.phys *= np.uint64(PAGE)
    ops.seq = r["seq"]
    ops.csum = r["csum"]
    good = _valid_ops(ops, is_wide, tables)
    bad += int(nuse - np.count_nonzero(good)) + int(torn)
    local = (prefix_ids, layout_ids, max_prefix + 1, max_layout + 1, SLOT * (1 + end))
    return (ops if good.all() else ops.take(np.flatnonzero(good))), bad, local


def _mapped(idmap: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``idmap[ids]`` (int64), ids past its end mapped to its last entry ("no such id")."""
    if ids.shape[0] and (ids == ids[0]).all():      # one id throughout (the usual file): no gather
        return np.full(ids.shape[0], idmap[min(int(ids[0]), idmap.shape[0] - 1)], np.int64)
    return idmap[np.minimum(ids, idmap.shape[0] - 1)]


def _gather(body: bytes, ok, tag, span, i: int) -> Optional[bytes]:
    """The payload of the table entry whose first slot is ``i``, or None if incomplete."""
    n = int(span[i])
    if n < 1 or i + n > tag.shape[0]:
        return None
    parts = [body[i * SLOT + DEF_HEAD.size:(i + 1) * SLOT]]
    for j in range(1, n):
        s = i + j
        if not ok[s] or tag[s] != CONT or span[s] != j:
            return None
        parts.append(body[s * SLOT + CONT_HEAD.size:(s + 1) * SLOT])
    payload = b"".join(parts)
    (length,) = struct.unpack_from("<I", payload)
    return payload[4:4 + length] if length <= len(payload) - 4 else None


def _valid_ops(ops: Ops, is_wide: np.ndarray, tables: Tables) -> np.ndarray:
    """Which operations name a possible key (and, for puts, a possible extent)."""
    good = ops.prefix >= 0
    if not len(ops):
        return good
    nd = ops.ndig
    good &= np.where(is_wide, (nd > NARROW) & (nd <= 2 * NARROW), (nd >= 1) & (nd <= NARROW))
    strlen = np.array([p.strlen for p in tables.prefixes] + [0], np.int64)
    if (strlen + 2 * NARROW > MAX_KEY_STRING).any():   # a prefix too long for some hash lengths
        good &= strlen[ops.prefix] + nd <= MAX_KEY_STRING
    # A hash may have no more significant digits than its recorded length.
    short = np.flatnonzero(good & ~is_wide & (nd < NARROW))
    if short.size:
        good[short] &= _leading_zero_nibbles(ops.lo[short]) >= NARROW - nd[short].astype(np.int64)
    w = np.flatnonzero(good & is_wide)
    if w.size:
        both = np.concatenate([ops.hi[w], ops.lo[w]], axis=1)
        good[w] &= _leading_zero_nibbles(both) >= 2 * NARROW - nd[w].astype(np.int64)
    # A put's extent holds its layout's bytes (and at least one page).
    need = np.array([max(1, min(v.nbytes, MAX_U64)) for v in tables.layouts] + [MAX_U64], np.uint64)
    lay = ops.layout          # -1 for deletes
    if (lay >= 0).all() and int(ops.phys.min()) >= int(need[:-1].max(initial=0)):
        return good                     # every op a put, every extent large enough for any layout
    good &= ~ops.is_put | (ops.phys >= need[lay])
    return good
