"""``KeyCodes``: the disk index's keys, prefixes and layouts as small integers, and back.

The disk index keeps each chunk as a row of numbers (``entry_table``); this
module maps between those numbers and the library's objects:

* a key prefix (fmt, model_name, world_size, worker_id) and a layout (shape,
  dtype, fmt) are interned in a ``Tables`` (the one the index was loaded
  with, so the load's ids stay valid);
* a *key class* is a (prefix, hash digit count) pair: with the hash's value
  it names a key exactly; a *kind* is a (key class, layout) pair, one u32 a
  row;
* a key's hash is three numbers: its low 64 bits, the next 64, and the
  bits above 128 (nonzero only for a chunk_hash of over 32 hex digits);
* :func:`home` hashes (prefix id and digit count, the two words) to 64
  bits, the same in NumPy (:func:`homes`) and in Python, so the sort that
  merges a load's records also places them in the hash table.

Invariants: every prefix and layout here was validated once (``Tables``), so
keys made here (:meth:`KeyCodes.key`) equal and hash as the constructor's
would; :meth:`KeyCodes.probe` of a key whose key class was never stored is
None (no stored key can equal it) and interns nothing; ids only grow.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..key import CacheEngineKey
from .index_codec import NARROW, Layout, Tables
from .index_columns import hex_strings, key_template, new_key

__all__ = ["KeyCodes", "FREE_KIND", "M64", "MULTIPLIERS", "big_endian", "home", "homes", "ident_homes", "ident_words"]

M64 = (1 << 64) - 1

#: What :func:`home` multiplies by, and xors in last (a table may be given others: tests make keys collide).
MULTIPLIERS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0)
#: The kind of a row that holds no entry.
FREE_KIND = 0xFFFFFFFF


def home(ident: int, a: int, b: int, m: tuple = ()) -> int:
    """A 64-bit hash of a key: ``ident`` (prefix id << 8 | digit count) and its low and next 64
    bits. ``m``: the multipliers and a final xor (``MULTIPLIERS`` unless given)."""
    k1, k2, k3, k4 = m or MULTIPLIERS
    x = a ^ ((b * k1) & M64) ^ ((ident * k2) & M64)
    x ^= x >> 31
    return ((x * k3) & M64) ^ k4


def homes(ident: np.ndarray, a: np.ndarray, b: np.ndarray, m: tuple = ()) -> np.ndarray:
    """:func:`home` of each row of the uint64 columns (wrapping arithmetic, as in Python mod 2**64)."""
    k1, k2, k3, k4 = m or MULTIPLIERS
    x = b * np.uint64(k1)
    x ^= a
    x ^= ident * np.uint64(k2)
    x ^= x >> np.uint64(31)
    x *= np.uint64(k3)
    x ^= np.uint64(k4)
    return x


def ident_words(ident: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The low and next 64 bits of each hash in ``index_columns.key_ident``'s columns (which hold its
    big-endian bytes read as little-endian words)."""
    return ident[2].byteswap(), ident[1].byteswap()


def ident_homes(ident: list[np.ndarray]) -> np.ndarray:
    """:func:`homes` of ``index_columns.key_ident``'s columns (a fingerprint for ``merge_order``)."""
    return homes(ident[0], *ident_words(ident))


class KeyCodes:
    """Numbers for the keys and layouts of one disk index (see the module notes)."""

    def __init__(self, tables: Optional[Tables] = None):
        self.tables = tables if tables is not None else Tables()
        self._kc: dict[tuple, int] = {}          # (fmt, model_name, world_size, worker_id, digits) -> key class
        self._kinds: dict[tuple, int] = {}       # (key class, layout id) -> kind
        self.kc_pid: list[int] = []
        self.kc_ndig: list[int] = []
        self.kc_ident: list[int] = []             # key class -> prefix id << 8 | digits (what homes hash)
        self.kind_kc: list[int] = []             # kind -> key class (read per lookup)
        self.kind_lid: list[int] = []
        self._templates: dict[int, dict] = {}    # prefix id -> a key's instance dict, hash left out
        self._entry_kinds: dict[tuple, int] = {}  # an entry's key prefix, digits and layout -> its kind
        self._arrays: Optional[tuple] = None     # NumPy copies of the kind tables, made when asked

    # -- a key's numbers --------------------------------------------------------------------------
    def probe(self, key: CacheEngineKey) -> Optional[tuple[int, int, int, int]]:
        """(key class, low 64 bits, next 64, bits above 128) of ``key``; None if no stored key has its class."""
        h = key.chunk_hash
        kc = self._kc.get((key.fmt, key.model_name, key.world_size, key.worker_id, len(h)))
        if kc is None:
            return None
        v = int(h, 16)
        return kc, v & M64, (v >> 64) & M64, v >> 128

    def probe_map(self) -> dict[tuple, int]:
        """(fmt, model_name, world_size, worker_id, digits) -> key class (what :meth:`probe` reads)."""
        return self._kc

    def kind_of(self, key: CacheEngineKey, layout: tuple) -> int:
        """The kind of a key stored with ``layout`` (shape, dtype, fmt), interning what is new.

        Raises ``ValueError`` for a prefix or layout that cannot be recorded (the
        index log refuses such entries before this is asked).
        """
        fields = (key.fmt, key.model_name, key.world_size, key.worker_id)
        pid = self.tables.prefix_ids.get(fields)
        if pid is None:
            pid = self.tables.prefix(fields)
        lid = self.tables.layout_ids.get(layout)
        if lid is None:
            lid = self.tables.layout(layout)
        if pid < 0 or lid < 0:
            raise ValueError(f"key prefix {fields!r} or layout {layout!r} cannot be recorded")
        return self._kind(self._class(pid, len(key.chunk_hash)), lid)

    def entry_kind(self, e) -> int:
        """:meth:`kind_of` a ``DiskEntry``'s key and layout (one dict lookup once they were seen)."""
        k = e.key
        sig = (k.fmt, k.model_name, k.world_size, k.worker_id, len(k.chunk_hash), e.shape, e.dtype, e.fmt)
        try:
            kind = self._entry_kinds.get(sig)
        except TypeError:              # an unhashable shape (a list)
            return self.kind_of(k, (tuple(e.shape), e.dtype, e.fmt))
        if kind is None:
            kind = self._entry_kinds[sig] = self.kind_of(k, (tuple(e.shape), e.dtype, e.fmt))
        return kind

    def _class(self, pid: int, ndig: int) -> int:
        fields = self.tables.prefixes[pid].fields
        kc = self._kc.get(fields + (ndig,))
        if kc is None:
            kc = self._kc[fields + (ndig,)] = len(self.kc_pid)
            self.kc_pid.append(pid)
            self.kc_ndig.append(ndig)
            self.kc_ident.append(pid << 8 | ndig)
        return kc

    def _kind(self, kc: int, lid: int) -> int:
        kind = self._kinds.get((kc, lid))
        if kind is None:
            kind = self._kinds[(kc, lid)] = len(self.kind_kc)
            assert kind < FREE_KIND, "kinds exhausted"
            self.kind_kc.append(kc)
            self.kind_lid.append(lid)
            self._arrays = None
        return kind

    def kinds_of(self, prefix: np.ndarray, ndig: np.ndarray, layout: np.ndarray) -> np.ndarray:
        """The kind of each put of these columns (``Ops``'s; ids into this ``tables``), as uint32."""
        n = prefix.shape[0]
        if n == 0:
            return np.zeros(0, np.uint32)
        lcount = len(self.tables.layouts) + 1
        code = (prefix.astype(np.int64) * 65 + ndig) * lcount + layout
        size = (len(self.tables.prefixes) + 1) * 65 * lcount
        if size <= 1 << 24:
            seen = np.zeros(size, bool)
            seen[code] = True
            present = np.flatnonzero(seen)
            dense = np.zeros(size, np.uint32)
            dense[present] = [self._code_kind(c, lcount) for c in present.tolist()]
            return dense[code]
        present, inverse = np.unique(code, return_inverse=True)
        return np.array([self._code_kind(c, lcount) for c in present.tolist()], np.uint32)[inverse]

    def _code_kind(self, code: int, lcount: int) -> int:
        rest, lid = divmod(code, lcount)
        pid, ndig = divmod(rest, 65)
        return self._kind(self._class(pid, ndig), lid)

    # -- back to objects ----------------------------------------------------------------------------
    def layout(self, kind: int) -> Layout:
        return self.tables.layouts[self.kind_lid[kind]]

    def template(self, pid: int) -> dict:
        t = self._templates.get(pid)
        if t is None:
            t = self._templates[pid] = key_template(self.tables.prefixes[pid].fields)
        return t

    def key(self, kind: int, a: int, b: int, hi: int) -> CacheEngineKey:
        """The key of a row: its kind, its hash's low and next 64 bits and the bits above 128."""
        kc = self.kind_kc[kind]
        return new_key(self.template(self.kc_pid[kc]), format(hi << 128 | b << 64 | a, f"0{self.kc_ndig[kc]}x"))

    def keys(self, kinds: np.ndarray, w: np.ndarray, his: dict[int, int]) -> list[CacheEngineKey]:
        """The keys of rows in bulk: ``kinds``, ``w`` (``(n, 2)`` words) and the bits above 128
        of the wide ones (``{position: bits}``)."""
        pid_k, ndig_k, _ = self.arrays()
        ndig = ndig_k[kinds]
        hashes = hex_strings(big_endian(w), np.minimum(ndig, NARROW))
        for i in np.flatnonzero(ndig > NARROW).tolist():
            hashes[i] = format(his.get(i, 0) << 128 | int(hashes[i], 16), f"0{int(ndig[i])}x")
        pids = pid_k[kinds].tolist()
        return [new_key(self.template(p), h) for p, h in zip(pids, hashes)]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kind -> prefix id, kind -> hash digits, kind -> layout id (NumPy; one extra, zero, last entry)."""
        if self._arrays is None:
            kc = np.array(self.kind_kc + [0], np.int64)
            pid = np.array(self.kc_pid + [0], np.int64)[kc] if self.kc_pid else np.zeros(1, np.int64)
            ndig = np.array(self.kc_ndig + [0], np.int64)[kc] if self.kc_ndig else np.zeros(1, np.int64)
            self._arrays = (pid, ndig, np.array(self.kind_lid + [0], np.int64))
        return self._arrays

    def ident_array(self) -> np.ndarray:
        """kind -> prefix id << 8 | digits, as uint64 (what :func:`homes` hashes)."""
        if not self.kind_kc:
            return np.zeros(1, np.uint64)
        return np.array(self.kc_ident + [0], np.uint64)[np.array(self.kind_kc + [len(self.kc_ident)])]


def big_endian(w: np.ndarray) -> np.ndarray:
    """``(n, 2)`` words (low, next) as the ``(n, 16)`` big-endian bytes of the 128-bit values."""
    out = np.empty((w.shape[0], 2), ">u8")
    out[:, 0] = w[:, 1]
    out[:, 1] = w[:, 0]
    return out.view(np.uint8).reshape(w.shape[0], 16)
