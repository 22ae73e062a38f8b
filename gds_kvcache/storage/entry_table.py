"""``EntryTable``: the disk index's live entries as rows of NumPy columns, found by key.

Each live chunk is one row: its hash's low 128 bits (16 bytes), its kind (``key_codes``: prefix, digit count and layout;
4 bytes), its extent (offset and size in pages, 8 bytes), checksum and seq
(8 each): 44 bytes, with no Python object. Keys are found through an
open-addressing hash table of row numbers (int32, linear probing, at most
3/4 full: 5.3 to 10.7 bytes a chunk), filled in bulk at load from the
sorted homes (the sort that merged the records) by a running maximum, and
kept by single inserts and backward-shift deletes after. A ``DiskEntry`` is
made only when asked (:meth:`EntryTable.entry`).

Invariants: every live row is in the hash table exactly once, reachable
from its home slot without crossing an empty slot; a free row has kind
``FREE_KIND`` and is in no slot; ``n`` counts live rows. Not thread-safe
(the disk index holds its lock around every call).
"""

from __future__ import annotations

from array import array
from typing import Callable, Optional

import numpy as np

from ..key import CacheEngineKey
from ..units import PAGE
from .entry import DiskEntry
from .index_codec import OFF_BITS
from .index_columns import EntryColumns
from .index_decode import Ops
from .key_codes import FREE_KIND, M64, MULTIPLIERS, KeyCodes, big_endian, home, homes

__all__ = ["EntryTable"]

_OFF_MASK = (1 << OFF_BITS) - 1
_LOW32 = np.uint64(0xFFFFFFFF)
_MAX_LOAD = 0.75


def _place(homes_sorted: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """A hash table of ``size`` slots holding ``rows`` by linear probing, their homes given sorted
    (int64; this overwrites them).

    Row i lands at max(home_i, slot of row i-1 + 1): a running maximum. Rows
    pushed past the end go on from slot 0, in order.
    """
    slots = np.full(size, -1, np.int32)
    m = rows.shape[0]
    if m:
        pos = homes_sorted
        ar = np.arange(m, dtype=np.int64)
        pos -= ar
        np.maximum.accumulate(pos, out=pos)
        pos += ar
        del ar
        if pos[-1] < size:                # none past the end (the usual case): no masks
            slots[pos] = rows
            return slots
        fit = pos < size
        slots[pos[fit]] = rows[fit]
        spill = rows[~fit].tolist()
        s, j = memoryview(slots), 0
        for row in spill:
            while s[j] >= 0:
                j += 1
            s[j] = row
            j += 1
    return slots


def _slot_count(n: int) -> int:
    size = 1024
    while n > _MAX_LOAD * size:
        size *= 2
    return size


class EntryTable:
    """Live entries of one disk index as rows (see the module notes)."""

    #: ``key_codes.home``'s multipliers (inlined in the hot paths); tests give others to make keys collide.
    mul = MULTIPLIERS

    def __init__(self, codes: Optional[KeyCodes] = None):
        self.codes = codes if codes is not None else KeyCodes()
        # The codes' lookup tables, read by every find (they only grow, in place).
        self._kc, self._kc_ident, self._kind_kc = self.codes.probe_map(), self.codes.kc_ident, self.codes.kind_kc
        self.n = 0                      # live rows
        self.top = 0                    # rows ever handed out (the rest of the columns is unused)
        self._free = array("q")         # rows to reuse
        self._hi: dict[int, int] = {}   # row -> its hash's bits above 128 (wide hashes only)
        self._columns(1024)
        self._set_slots(np.full(1024, -1, np.int32))

    def __len__(self) -> int:
        return self.n

    # -- storage ---------------------------------------------------------------------------------
    def _columns(self, cap: int) -> None:
        """(Re)allocate the columns for ``cap`` rows, keeping the first ``top``."""
        old = getattr(self, "kind", None)
        w, kind = np.empty(2 * cap, np.uint64), np.empty(cap, np.uint32)
        ext, csum, seq = np.empty(cap, np.uint64), np.empty(cap, np.uint64), np.empty(cap, np.uint64)
        if old is not None:
            t = self.top
            w[:2 * t], kind[:t], ext[:t], csum[:t], seq[:t] = (self.w[:2 * t], self.kind[:t], self.ext[:t],
                                                               self.csum[:t], self.seq[:t])
        self.w, self.kind, self.ext, self.csum, self.seq = w, kind, ext, csum, seq
        self.cap = cap
        # Item access through memoryviews gives and takes Python ints, several times
        # faster than NumPy scalar indexing.
        self._W, self._K, self._E = memoryview(w), memoryview(kind), memoryview(ext)
        self._C, self._Q = memoryview(csum), memoryview(seq)

    def _set_slots(self, slots: np.ndarray) -> None:
        self.slots = slots
        self._S = memoryview(slots)
        self._mask = slots.shape[0] - 1
        self._shift = 64 - (slots.shape[0].bit_length() - 1)
        self._limit = int(_MAX_LOAD * slots.shape[0])

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.kind[:self.top] != FREE_KIND)

    # -- bulk ----------------------------------------------------------------------------------------
    def load(self, ops: Ops, live: np.ndarray, packed: Optional[np.ndarray] = None) -> None:
        """Hold exactly the puts ``ops[live]`` (distinct keys; ids into ``self.codes.tables``), row i
        = ``ops[live[i]]``. ``packed``: ``index_columns.merge_order``'s sorted words of ``ops`` under
        ``key_codes.ident_homes`` (else the homes are computed and sorted here)."""
        n = live.shape[0]
        # Every operation, in order (the usual reopen): slices rather than gathers.
        everything = n == len(ops) and bool((live[1:] > live[:-1]).all())
        self.top = 0
        self._columns(n + max(1024, n >> 3))
        pick = slice(None) if everything else live
        self.kind[:n] = self.codes.kinds_of(ops.prefix[pick], ops.ndig[pick], ops.layout[pick])
        lo = ops.lo.view(">u8")[pick]                    # (n, 2): the high word first
        w = self.w[:2 * n].reshape(n, 2)
        w[:, 0] = lo[:, 1]
        w[:, 1] = lo[:, 0]
        del lo, w
        self.ext[:n] = ops.offset[pick] // np.uint64(PAGE) | (ops.phys[pick] // np.uint64(PAGE)) << np.uint64(OFF_BITS)
        self.csum[:n] = ops.csum[pick]
        self.seq[:n] = ops.seq[pick]
        self._hi = {}
        if ops.hi is not None:
            hi = ops.hi[pick]
            for i in np.flatnonzero(hi.any(axis=1)).tolist():
                self._hi[i] = int.from_bytes(bytes(hi[i]), "big")
        self.top = self.n = n
        self._free = array("q")
        size = _slot_count(n)
        if packed is None or size.bit_length() - 1 > 32:
            self._rebuild_slots(size)
            return
        # The low half of each word is its operation's index; the top bits of the high half its home.
        shift = np.uint64(64 - (size.bit_length() - 1))
        rows = packed.view(np.uint32)[::2] if packed.dtype.byteorder in "=<" else packed & _LOW32
        if not everything:
            row_of = np.full(len(ops), -1, np.int64)
            row_of[live] = np.arange(n)
            rows = row_of[rows]
            del row_of
            sel = rows >= 0
            self._set_slots(_place((packed[sel] >> shift).view(np.int64), rows[sel], size))
        else:
            self._set_slots(_place((packed >> shift).view(np.int64), rows, size))

    def _rebuild_slots(self, size: int) -> None:
        """Place every live row in a new hash table of ``size`` slots."""
        rows = np.arange(self.top) if self.n == self.top else self.live_rows()
        shift = np.uint64(64 - (size.bit_length() - 1))
        packed = (self._homes(rows) >> shift) << np.uint64(32) | rows.astype(np.uint64)
        del rows
        packed.sort()
        self._set_slots(_place((packed >> np.uint64(32)).view(np.int64), (packed & _LOW32).astype(np.int64), size))

    def _homes(self, rows: np.ndarray) -> np.ndarray:
        w = self.w.reshape(-1, 2)
        if rows.shape[0] == self.top:        # every row: slices, not gathers
            t = self.top
            return homes(self.codes.ident_array()[self.kind[:t]], w[:t, 0], w[:t, 1], self.mul)
        return homes(self.codes.ident_array()[self.kind[rows]], w[rows, 0], w[rows, 1], self.mul)

    # -- one key ---------------------------------------------------------------------------------------
    def find(self, key: CacheEngineKey) -> int:
        """The row of ``key``, or -1 (``KeyCodes.probe`` and :meth:`find_probe` in one: the hot path)."""
        h = key.chunk_hash
        kc = self._kc.get((key.fmt, key.model_name, key.world_size, key.worker_id, len(h)))
        if kc is None:
            return -1
        v = int(h, 16)
        a, b = v & M64, (v >> 64) & M64
        k1, k2, k3, k4 = self.mul             # home(), inlined: the call costs more than the arithmetic
        x = a ^ ((b * k1) & M64) ^ ((self._kc_ident[kc] * k2) & M64)
        x ^= x >> 31
        i = (((x * k3) & M64) ^ k4) >> self._shift
        S, W, K, KC, mask = self._S, self._W, self._K, self._kind_kc, self._mask
        while True:
            r = S[i]
            if r < 0:
                return -1
            if W[2 * r] == a and W[2 * r + 1] == b and KC[K[r]] == kc and (
                    not self._hi or self._hi.get(r, 0) == v >> 128):
                return r
            i = (i + 1) & mask

    def find_probe(self, kc: int, w0: int, w1: int, hi: int) -> int:
        """The row of the key with these numbers (``KeyCodes.probe``), or -1."""
        S, W, K, KC, mask = self._S, self._W, self._K, self.codes.kind_kc, self._mask
        i = home(self.codes.kc_ident[kc], w0, w1, self.mul) >> self._shift
        while True:
            r = S[i]
            if r < 0:
                return -1
            if W[2 * r] == w0 and W[2 * r + 1] == w1 and KC[K[r]] == kc and self._hi.get(r, 0) == hi:
                return r
            i = (i + 1) & mask

    def insert(self, probe: tuple[int, int, int, int], kind: int, offset: int, phys: int, csum: int,
               seq: int) -> int:
        """Add a key that is not in the table (``probe``: its ``KeyCodes.probe``); returns its row."""
        kc, w0, w1, hi = probe
        if self.n + 1 > self._limit:
            self._rebuild_slots(2 * self.slots.shape[0])
        if self._free:
            row = self._free.pop()
        else:
            if self.top == self.cap:
                self._columns(self.cap + max(1024, self.cap >> 1))
            row = self.top
            self.top += 1
        self._W[2 * row] = w0
        self._W[2 * row + 1] = w1
        self._K[row] = kind
        self._E[row] = offset // PAGE | (phys // PAGE) << OFF_BITS
        self._C[row] = csum
        self._Q[row] = seq
        if hi:
            self._hi[row] = hi
        S, mask = self._S, self._mask
        k1, k2, k3, k4 = self.mul
        x = w0 ^ ((w1 * k1) & M64) ^ ((self._kc_ident[kc] * k2) & M64)
        x ^= x >> 31
        i = (((x * k3) & M64) ^ k4) >> self._shift
        while S[i] >= 0:
            i = (i + 1) & mask
        S[i] = row
        self.n += 1
        return row

    def insert_entry(self, e: DiskEntry) -> int:
        """:meth:`insert` of a ``DiskEntry`` (valid, its key not in the table); returns its row."""
        kind = self.codes.entry_kind(e)
        v = int(e.key.chunk_hash, 16)
        return self.insert((self._kind_kc[kind], v & M64, (v >> 64) & M64, v >> 128), kind, e.offset, e.phys_size,
                           e.checksum, e.seq)

    def _home_of(self, row: int) -> int:
        kc = self.codes.kind_kc[self._K[row]]
        return home(self.codes.kc_ident[kc], self._W[2 * row], self._W[2 * row + 1], self.mul) >> self._shift

    def remove(self, row: int) -> None:
        """Forget a live row (backward-shift delete: no tombstones, probes stay short)."""
        S, mask = self._S, self._mask
        i = self._home_of(row)
        while S[i] != row:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            r = S[j]
            if r < 0:
                break
            k = self._home_of(r)
            if (i - k) & mask < (j - k) & mask:    # r may move back to the hole at i
                S[i] = r
                i = j
        S[i] = -1
        self._K[row] = FREE_KIND
        self._hi.pop(row, None)
        self._free.append(row)
        self.n -= 1

    # -- reading rows ------------------------------------------------------------------------------------
    def extent(self, row: int) -> tuple[int, int]:
        """(offset, phys_size) of a live row."""
        ext = self._E[row]
        return (ext & _OFF_MASK) * PAGE, (ext >> OFF_BITS) * PAGE

    def seq_of(self, row: int) -> int:
        return self._Q[row]

    def extents(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, phys sizes) of ``rows``, as uint64 arrays."""
        ext = self.ext[rows]
        return (ext & np.uint64(_OFF_MASK)) * np.uint64(PAGE), (ext >> np.uint64(OFF_BITS)) * np.uint64(PAGE)

    def key(self, row: int) -> CacheEngineKey:
        return self.codes.key(self._K[row], self._W[2 * row], self._W[2 * row + 1], self._hi.get(row, 0))

    def entry(self, row: int, key: Optional[CacheEngineKey] = None) -> DiskEntry:
        """A new ``DiskEntry`` of a live row (``key``: the caller's equal key, to reuse)."""
        lay = self.codes.layout(self._K[row])
        off, phys = self.extent(row)
        return DiskEntry(self.key(row) if key is None else key, off, lay.nbytes, phys, lay.shape, lay.dtype,
                         lay.fmt, self._C[row], self._Q[row])

    def keys(self, rows: np.ndarray) -> list[CacheEngineKey]:
        """The keys of ``rows``, in bulk."""
        his = {i: self._hi[r] for i, r in enumerate(rows.tolist()) if r in self._hi} if self._hi else {}
        return self.codes.keys(self.kind[rows], self.w.reshape(-1, 2)[rows], his)

    def key_batch(self, rows: np.ndarray) -> Callable[[], list[CacheEngineKey]]:
        """What :meth:`keys` of ``rows`` gives, made when called (the rows may change meanwhile)."""
        kinds, w = self.kind[rows], self.w.reshape(-1, 2)[rows]
        his = {i: self._hi[r] for i, r in enumerate(rows.tolist()) if r in self._hi} if self._hi else {}
        codes = self.codes
        return lambda: codes.keys(kinds, w, his)

    def columns(self, rows: np.ndarray) -> EntryColumns:
        """``rows`` as ``EntryColumns`` in ``seq`` order (what a snapshot writes)."""
        rows = rows[np.argsort(self.seq[rows], kind="stable")]
        n = rows.shape[0]
        pid_k, ndig_k, lid_k = self.codes.arrays()
        kinds = self.kind[rows]
        ops = Ops(0)
        ops.is_put = np.ones(n, bool)
        ops.prefix, ops.layout = pid_k[kinds], lid_k[kinds]
        ops.ndig = ndig_k[kinds].astype(np.uint8)
        ops.lo = big_endian(self.w.reshape(-1, 2)[rows])
        ops.hi = None
        if self._hi:
            wide = [(i, self._hi[r]) for i, r in enumerate(rows.tolist()) if r in self._hi]
            if wide:
                ops.hi = np.zeros((n, 16), np.uint8)
                for i, v in wide:
                    ops.hi[i] = np.frombuffer(v.to_bytes(16, "big"), np.uint8)
        ops.offset, ops.phys = self.extents(rows)
        ops.seq, ops.csum = self.seq[rows], self.csum[rows]
        return EntryColumns(ops, self.codes.tables)

    # -- checks -----------------------------------------------------------------------------------------
    def check(self) -> bool:
        """Assert the invariants (module notes); O(rows)."""
        rows = self.live_rows()
        assert rows.shape[0] == self.n, f"{rows.shape[0]} live rows, counted {self.n}"
        in_slots = self.slots[self.slots >= 0]
        assert in_slots.shape[0] == self.n and np.array_equal(np.sort(in_slots), rows), "slots and rows differ"
        assert sorted(self._free.tolist()) == sorted(set(range(self.top)) - set(rows.tolist())), "free rows wrong"
        for r in rows.tolist():
            kc = self.codes.kind_kc[self._K[r]]
            assert self.find_probe(kc, self._W[2 * r], self._W[2 * r + 1], self._hi.get(r, 0)) == r, \
                f"row {r} not found from its home"
        return True

