"""The disk index's on-disk format: fixed 56-byte binary records, a snapshot plus a log.

Files (all in the cache directory, all named ``kvcache.index*``):

``kvcache.index.snap``
    The state at the last :meth:`IndexLog.snapshot`: a header, the interning
    tables, then one put record per live chunk, in ``seq`` order.
``kvcache.index.log``
    Puts and deletes since that snapshot, one ``os.write`` per batch. Its
    header carries the snapshot's *generation* (a random 64-bit number); a
    log whose generation is not the snapshot's is stale and ignored.
``kvcache.index.snap.tmp``, ``kvcache.index.log.tmp``
    Files being written; never read, overwritten by the next snapshot.
``kvcache.index``
    The JSON-lines index of earlier versions (format version 1); read
    (migrated) while there is no binary snapshot, deleted by the first one.

A file is a header slot followed by 56-byte *slots*. Every slot carries a
32-bit check of its other 52 bytes, so a torn or altered slot is found and
skipped without losing the framing of the ones after it. A put or delete of
a key whose ``chunk_hash`` has at most 32 hex digits (the 128-bit prefix hash
the library makes) is one slot; a wider hash (up to 64 digits) takes two.
A key's fmt/model_name/world_size/worker_id and a chunk's shape/dtype/fmt are
interned in per-file tables (definition records, one or a few slots each)
and named by number, so every record of the common case has one fixed layout
and millions of them are decoded with NumPy in bulk.

Record slot (little-endian)::

    0 tag u1 | 1 ndig u1 | 2 span u2 | 4 check u4 | 8 prefix id u4 | 12 layout id u4
    16 offset/4096 (40 bits) | phys_size/4096 (24 bits) | 24 seq u8 | 32 checksum u8
    40 chunk_hash, low 128 bits, big-endian (16 bytes)

so a pool may reach 4 PiB and a chunk 64 GiB.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ClosedError, GdsKvCacheError, IndexFormatError
from ..key import MAX_KEY_STRING, CacheEngineKey
from ..memory.format import MemoryFormat, str_to_dtype
from ..units import PAGE

__all__ = ["INDEX_VERSION", "INDEX_MAGIC", "SLOT", "TABLE_ALLOWANCE", "SNAP_NAME", "LOG_NAME", "LEGACY_NAME",
           "MAX_OFFSET", "MAX_PHYS_SIZE", "DiskEntry", "IndexLog", "IndexEntryError"]

log = logging.getLogger(__name__)

#: Format version of the binary files. Version 1 was the JSON-lines log
#: (``kvcache.index``, migrated on load); versions count across both.
INDEX_VERSION = 2
INDEX_MAGIC = b"GKVINDEX"
#: Bytes of one slot: the header and every record slot.
SLOT = 56
#: Default allowance for the interning tables in :meth:`IndexLog.size_of`: 64
#: slots, e.g. 4 key prefixes with the longest model names and 40 chunk shapes.
TABLE_ALLOWANCE = 64 * SLOT

SNAP_NAME = "kvcache.index.snap"
LOG_NAME = "kvcache.index.log"
LEGACY_NAME = "kvcache.index"
_LEGACY_MAGIC = "gds_kvcache-index"
_LEGACY_VERSION = 1

_KIND_SNAP = 1
_KIND_LOG = 2

# Record tags (first byte of a slot).
_PUT = ord("P")         # put, hash of 1-32 hex digits: 1 slot
_DEL = ord("D")         # delete, hash of 1-32 digits: 1 slot
_PUT_WIDE = ord("W")    # put, hash of 33-64 digits: head slot + 1 continuation holding the high 128 bits
_DEL_WIDE = ord("E")    # delete, hash of 33-64 digits: same
_DEF_PREFIX = ord("K")  # table entry: (fmt, model_name, world_size, worker_id)
_DEF_LAYOUT = ord("L")  # table entry: (shape, dtype, fmt)
_CONT = ord("C")        # continuation slot; its span field is its index in the record

_SLOT_DTYPE = np.dtype([("tag", "u1"), ("ndig", "u1"), ("span", "<u2"), ("check", "<u4"), ("prefix", "<u4"),
                        ("layout", "<u4"), ("ext", "<u8"), ("seq", "<u8"), ("csum", "<u8"), ("hash", "u1", (16,))])
assert _SLOT_DTYPE.itemsize == SLOT
_REC = struct.Struct("<BBHIIIQQQ16s")            # a record slot, check left 0
_HEAD = struct.Struct("<8sIIQI20xQ")             # magic, version, kind, generation, slot size, check
_DEF_HEAD = struct.Struct("<BBHII")              # tag, 0, span, check, table id; then payload
_CONT_HEAD = struct.Struct("<BBHI")              # tag C, 0, index, check; then payload
_DEF_FIRST = SLOT - _DEF_HEAD.size               # 44 payload bytes in a table entry's first slot
_CONT_BODY = SLOT - _CONT_HEAD.size              # 48 in each continuation
assert _HEAD.size == SLOT

_OFF_BITS = 40
_PHYS_BITS = 64 - _OFF_BITS
#: Largest pool offset and chunk extent a record can hold.
MAX_OFFSET = ((1 << _OFF_BITS) - 1) * PAGE
MAX_PHYS_SIZE = ((1 << _PHYS_BITS) - 1) * PAGE
_MAX_U64 = (1 << 64) - 1
_NARROW = 32                                     # hex digits a one-slot record holds

# Multiply-xorshift chain over 64-bit words. Each step is a bijection of the
# word it takes in, so before truncation any change confined to one word
# changes the result; the 32-bit slot check lets a corruption through with
# probability 2**-32, as a CRC32 would. A CRC per record would need one
# Python call per record; this runs as a few NumPy passes over all of them.
_SEED = np.uint64(0x6A09E667F3BCC908)
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_BLOCK = 1 << 15                                 # slots per NumPy pass (1.8 MiB: stays in cache)
_BUILD_BLOCK = 1 << 16                           # entries built per round (bounds temporaries)

_KEY = attrgetter("key")
_PREFIX = attrgetter("fmt", "model_name", "world_size", "worker_id")
_LAYOUT = attrgetter("shape", "dtype", "fmt")
_HASH = attrgetter("chunk_hash")
_OFFSET, _PHYS, _NBYTES = attrgetter("offset"), attrgetter("phys_size"), attrgetter("nbytes")
_CSUM, _SEQ = attrgetter("checksum"), attrgetter("seq")


class IndexEntryError(GdsKvCacheError, ValueError):
    """An entry handed to :class:`IndexLog` cannot be recorded (a bug in the caller)."""


@dataclass(slots=True)
class DiskEntry:
    """Where one chunk lives in the pool, and what it is.

    ``readers`` and ``doomed`` are runtime state of the disk tier, never written.
    """

    key: CacheEngineKey
    offset: int             # logical pool offset, 4 KiB-aligned
    nbytes: int             # logical bytes (> 0)
    phys_size: int          # nbytes rounded up to 4 KiB (or more); a 4 KiB multiple
    shape: tuple            # ints >= 0
    dtype: str              # as memory.format.dtype_to_str gives
    fmt: str                # MemoryFormat name
    checksum: int           # 64-bit unsigned
    seq: int = 0            # order of the put (recency); assigned by IndexLog.append
    readers: int = 0        # runtime only, never persisted
    doomed: bool = False    # runtime only, never persisted


# -- checks -------------------------------------------------------------------------
def _mix(cols: Sequence[np.ndarray]) -> np.ndarray:
    """A 64-bit hash of each row of the uint64 columns ``cols``."""
    h = np.full(cols[0].shape[0], _SEED, np.uint64)
    t = np.empty_like(h)
    for c in cols:
        np.multiply(c, _K1, out=t)
        t ^= t >> 31
        h ^= t
        h *= _K2
    h ^= h >> 29
    h *= _K3
    h ^= h >> 32
    return h


def _words(buf) -> np.ndarray:
    raw = buf.view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    return raw.reshape(-1, SLOT).view("<u8")


def _slot_checks(words: np.ndarray) -> np.ndarray:
    """The check of each slot of ``words`` (``(n, 7)`` uint64): its bytes other than 4-7, hashed."""
    out = np.empty(words.shape[0], np.uint32)
    for s in range(0, words.shape[0], _BLOCK):
        w = words[s:s + _BLOCK]
        cols = [w[:, 0] & _LOW32] + [w[:, i] for i in range(1, SLOT // 8)]
        out[s:s + w.shape[0]] = _mix(cols) & _LOW32
    return out


def _seal(buf) -> None:
    """Fill in the check of every slot of ``buf`` (a writable buffer of whole slots)."""
    words = _words(buf)
    words[:, 0] = (words[:, 0] & _LOW32) | (_slot_checks(words).astype(np.uint64) << np.uint64(32))


def _header_check(buf) -> int:
    w = np.frombuffer(buf[:SLOT - 8], "<u8")
    return int(_mix([w[i:i + 1] for i in range(w.shape[0])])[0])


# -- table entries --------------------------------------------------------------------
def _pack_strs(*parts: bytes) -> bytes:
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


def _unpack_strs(payload: bytes, count: int) -> tuple[list[bytes], int]:
    out, pos = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        if pos + n > len(payload):
            raise ValueError("a string runs past its record")
        out.append(payload[pos:pos + n])
        pos += n
    return out, pos


def _prefix_payload(fields: tuple) -> bytes:
    fmt, model, ws, wid = fields
    return _pack_strs(fmt.encode(), model.encode(), str(ws).encode(), str(wid).encode())


def _layout_payload(lay: tuple) -> bytes:
    shape, dtype, fmt = lay
    return _pack_strs(dtype.encode(), fmt.encode()) + struct.pack(f"<H{len(shape)}Q", len(shape), *shape)


def _def_span(payload: bytes) -> int:
    rest = max(0, 4 + len(payload) - _DEF_FIRST)
    return 1 + -(-rest // _CONT_BODY)


def _def_slots(tag: int, ident: int, payload: bytes) -> bytes:
    """A table entry as whole slots (checks left 0 for :func:`_seal`)."""
    span = _def_span(payload)
    payload = struct.pack("<I", len(payload)) + payload
    payload = payload.ljust(_DEF_FIRST + (span - 1) * _CONT_BODY, b"\0")
    out = [_DEF_HEAD.pack(tag, 0, span, 0, ident) + payload[:_DEF_FIRST]]
    for j in range(1, span):
        out.append(_CONT_HEAD.pack(_CONT, 0, j, 0) + payload[_DEF_FIRST + (j - 1) * _CONT_BODY:][:_CONT_BODY])
    return b"".join(out)


def _parse_prefix(payload: bytes) -> tuple:
    (fmt, model, ws, wid), _ = _unpack_strs(payload, 4)
    if not (ws.isdigit() and wid.isdigit()):
        raise ValueError("world_size/worker_id are not decimal")
    return (fmt.decode(), model.decode(), int(ws), int(wid))


def _parse_layout(payload: bytes) -> tuple:
    (dtype, fmt), pos = _unpack_strs(payload, 2)
    (ndim,) = struct.unpack_from("<H", payload, pos)
    return (struct.unpack_from(f"<{ndim}Q", payload, pos + 2), dtype.decode(), fmt.decode())


class _Prefix:
    """A validated key prefix and the length of its key string without the hash."""

    __slots__ = ("fields", "strlen")

    def __init__(self, fields: tuple):
        k = CacheEngineKey(*fields, "0")   # validates once for every key that uses it
        self.fields = fields
        self.strlen = len(k.to_string()) - 1


class _Layout:
    """A validated (shape, dtype, fmt) and the byte count it implies."""

    __slots__ = ("shape", "dtype", "fmt", "nbytes")

    def __init__(self, lay: tuple):
        shape, dtype, fmt = lay
        if not isinstance(fmt, str) or fmt not in MemoryFormat.__members__:
            raise ValueError(f"unknown memory format {fmt!r} (known: {', '.join(MemoryFormat.__members__)})")
        itemsize = str_to_dtype(dtype).itemsize
        shape = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_U64 for d in shape):
            raise ValueError(f"shape {shape!r} has a dimension that is not an int in [0, 2**64)")
        self.shape, self.dtype, self.fmt = shape, dtype, fmt
        self.nbytes = math.prod(shape) * itemsize
        if self.nbytes <= 0:
            raise ValueError(f"shape {shape!r} of {dtype} holds no bytes")


class _Tables:
    """Prefixes and layouts met while loading, numbered across files (-1: unusable)."""

    def __init__(self):
        self.prefix_ids: dict[tuple, int] = {}
        self.prefixes: list[_Prefix] = []
        self.layout_ids: dict[tuple, int] = {}
        self.layouts: list[_Layout] = []

    def prefix(self, fields: tuple) -> int:
        g = self.prefix_ids.get(fields)
        if g is None:
            try:
                p = _Prefix(fields)
            except GdsKvCacheError as e:
                log.warning("index key prefix %r unusable (%s); records that use it are skipped", fields, e)
                g = -1
            else:
                g = len(self.prefixes)
                self.prefixes.append(p)
            self.prefix_ids[fields] = g
        return g

    def layout(self, lay: tuple) -> int:
        g = self.layout_ids.get(lay)
        if g is None:
            try:
                v = _Layout(lay)
            except (GdsKvCacheError, ValueError) as e:
                log.warning("index layout %r unusable here (%s); records that use it are skipped", lay, e)
                g = -1
            else:
                g = len(self.layouts)
                self.layouts.append(v)
            self.layout_ids[lay] = g
        return g


# -- decoded operations ----------------------------------------------------------------
class _Ops:
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

    def take(self, idx: np.ndarray) -> "_Ops":
        o = _Ops.__new__(_Ops)
        for f in _Ops.__slots__:
            v = getattr(self, f)
            setattr(o, f, None if v is None else v[idx])
        return o

    @staticmethod
    def concat(parts: list["_Ops"]) -> "_Ops":
        parts = [p for p in parts if len(p)] or [_Ops()]
        if len(parts) == 1:
            return parts[0]
        o = _Ops.__new__(_Ops)
        wide = any(p.hi is not None for p in parts)
        for f in _Ops.__slots__:
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


def _hex_strings(b: np.ndarray, ndig: np.ndarray) -> list:
    """The last ``ndig[i]`` hex digits of each row of big-endian bytes ``b``, as ``str``."""
    n, m = b.shape
    # bytes.hex over a void view loops in C: twice as fast as NumPy's unicode
    # conversion (and an "S" view would drop trailing zero bytes).
    out = list(map(bytes.hex, np.ascontiguousarray(b).view(f"V{m}").ravel().tolist()))
    short = np.flatnonzero(ndig != 2 * m)
    if short.size:
        for i, c in zip(short.tolist(), (2 * m - ndig[short].astype(np.int64)).tolist()):
            out[i] = out[i][c:]
    return out


def _u64_cols(b: np.ndarray) -> list[np.ndarray]:
    """The two 64-bit words of each row of ``(n, 16)`` bytes (a view where the rows allow)."""
    w = b.view("<u8") if b.strides[-1] == 1 else np.ascontiguousarray(b).view("<u8")
    return [w[:, 0], w[:, 1]]


# -- files ---------------------------------------------------------------------------------
@dataclass
class _Header:
    gen: int
    ok: bool          # its check holds


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse_header(path: str, buf: bytes, kind: int) -> _Header:
    """Check magic and version (raising, the file untouched); read the generation."""
    magic = buf[:len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC[:len(magic)] or (len(buf) >= len(INDEX_MAGIC) and magic != INDEX_MAGIC):
        raise IndexFormatError(
            f"index file {path} does not start with the gds_kvcache index magic {INDEX_MAGIC!r} "
            f"(found {bytes(buf[:8])!r}): not written by this library; it is left untouched. "
            "Move it away to start with an empty index")
    if len(buf) < SLOT:
        return _Header(0, False)
    _, version, k, gen, slot, check = _HEAD.unpack_from(buf)
    if version != INDEX_VERSION:
        raise IndexFormatError(
            f"index file {path} is format version {version}; this library reads version {INDEX_VERSION} "
            f"(and migrates version {_LEGACY_VERSION}, the JSON-lines {LEGACY_NAME}). The files are left "
            "untouched: open the directory with the library version that wrote them, or move the "
            "kvcache.index* files away to start with an empty index")
    return _Header(gen, slot == SLOT and k == kind and check == _header_check(buf))


def _header_slot(kind: int, gen: int) -> bytes:
    head = _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, kind, gen, SLOT, 0)
    return _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, kind, gen, SLOT, _header_check(head))


def _legacy_decode(line: bytes) -> Optional[dict]:
    payload, sep, crc = line.rstrip(b"\n").rpartition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        rec = json.loads(payload)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _check_legacy_header(path: str, buf: bytes) -> None:
    """Raise unless ``buf`` is empty or a JSON-lines index of version 1."""
    if not buf:
        return
    rec = _legacy_decode(buf.split(b"\n", 1)[0])
    if rec is None or rec.get("magic") != _LEGACY_MAGIC:
        raise IndexFormatError(
            f"index file {path} is neither a gds_kvcache binary index nor its JSON-lines version "
            f"{_LEGACY_VERSION} (it starts {bytes(buf[:24])!r}); it is left untouched. Move it away to "
            "start with an empty index")
    if rec.get("version") != _LEGACY_VERSION:
        raise IndexFormatError(
            f"index file {path} is JSON-lines format version {rec.get('version')!r}; this library reads "
            f"binary version {INDEX_VERSION} and migrates JSON-lines version {_LEGACY_VERSION}. The files "
            "are left untouched")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, chunks: Iterable) -> int:
    """Write ``chunks`` to ``path`` (truncated first) and fsync it; return its size."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for c in chunks:
            mv = memoryview(c).cast("B")
            while mv:
                w = os.write(fd, mv)
                mv = mv[w:]
                n += w
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


# -- the index ---------------------------------------------------------------------------------
class IndexLog:
    """The on-disk index of one cache directory: a snapshot and a log of 56-byte records.

    Parameters
    ----------
    directory
        The cache directory; the files are ``kvcache.index*`` in it.

    Notes
    -----
    Call :meth:`load` once first (or :meth:`snapshot`); :meth:`append` and
    :meth:`next_seq` load lazily otherwise, which costs a full read.

    Crash safety: :meth:`append` writes a batch with one ``os.write`` on an
    ``O_APPEND`` descriptor, so a crash loses at most part of that batch;
    each slot's check rejects torn or altered slots, which :meth:`load`
    skips and counts. :meth:`snapshot` writes the new snapshot to a
    temporary file, fsyncs it, renames it into place and fsyncs the
    directory, and only then starts a new log of the new generation: an old
    log still on disk after a crash no longer matches and is ignored, so a
    crash leaves the old state or the new one, never a mix.

    Appends are not fsynced: a power cut may lose the last batches (those
    chunks read as absent), never half-apply them. A flipped bit in a
    delete loses that delete; in a table entry, every record that uses it.
    Both count as unusable records.

    Size: 56 bytes per chunk (112 with a chunk_hash of over 32 hex digits)
    plus one header slot per file and the tables; no cap. Loading is
    dominated by making the Python objects (``scripts/bench_index.py``
    splits it); the cyclic garbage collector is paused while they are made,
    since it would rescan the growing heap over and over.

    The caller serialises all calls (its own lock); this class takes none.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.snap_path = os.path.join(directory, SNAP_NAME)
        self.log_path = os.path.join(directory, LOG_NAME)
        self.legacy_path = os.path.join(directory, LEGACY_NAME)
        self._fd: Optional[int] = None
        self._closed = False
        self._loaded = False
        self._must_reset = False     # load found a corrupt header and returned nothing: next write starts over
        self._gen = 0                # generation the log must carry (0: no binary snapshot)
        self._log_usable = False     # the log on disk has that generation and may be appended to
        self._log_clean = 1 << 62    # its length without a torn tail (as load found it)
        self._seq = 0
        self._prefix_ids: dict[tuple, int] = {}   # table ids of the current log
        self._layout_ids: dict[tuple, int] = {}
        self._next_prefix = self._next_layout = 0
        self._table_slots: dict[tuple, int] = {}  # every prefix/layout seen -> slots its entry takes
        self._valid_layouts: dict[tuple, _Layout] = {}
        self._snap_records = self._log_records = 0
        self._snap_bytes = self._log_bytes = self._legacy_bytes = 0

    # -- sizes ------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes the index files take now (snapshot + log, and a JSON index not yet migrated)."""
        return self._snap_bytes + self._log_bytes + self._legacy_bytes

    @property
    def records(self) -> int:
        """Put and delete records in the snapshot and the log, live and dead (unusable ones too)."""
        return self._snap_records + self._log_records

    @property
    def table_bytes(self) -> int:
        """Bytes the table entries of every key prefix and layout seen so far take in one file."""
        return SLOT * sum(self._table_slots.values())

    @staticmethod
    def size_of(entries_count: int, wide: int = 0, table_bytes: int = TABLE_ALLOWANCE) -> int:
        """Upper bound on the bytes of a snapshot of ``entries_count`` entries.

        Parameters
        ----------
        entries_count
            Entries in the snapshot.
        wide
            How many of them have a chunk_hash of more than 32 hex digits (two slots each).
        table_bytes
            Bytes of the tables; :attr:`table_bytes` bounds what the entries
            seen by this log need, where the default allowance may not.

        Notes
        -----
        56 bytes an entry, 112 a wide one, one header slot, plus the tables.
        """
        return SLOT * (1 + entries_count + wide) + table_bytes

    # -- reading --------------------------------------------------------------------------
    def load(self) -> tuple[list[DiskEntry], int]:
        """Live entries sorted by ``seq``, and the number of unusable records skipped.

        Raises
        ------
        IndexFormatError
            An index file has a foreign magic or a newer/unknown version; no
            file is changed.

        Notes
        -----
        Reads the files in full and never writes. Later records win: a put
        after a delete of the same key is live, a delete after a put removes
        it. Unusable: torn or altered slots, and intact records naming an
        unknown dtype or fmt, a missing table entry or an impossible value.
        """
        if self._closed:
            raise ClosedError("index log is closed")
        snap = _read(self.snap_path)
        logb = _read(self.log_path)
        legacy = _read(self.legacy_path) if snap is None else None
        # Every file is checked before any is used, so a refusal changes nothing.
        snap_h = _parse_header(self.snap_path, snap, _KIND_SNAP) if snap is not None else None
        log_h = _parse_header(self.log_path, logb, _KIND_LOG) if logb else None
        if legacy is not None:
            _check_legacy_header(self.legacy_path, legacy)

        self._reset_state()
        self._snap_bytes = len(snap) if snap is not None else 0
        self._log_bytes = len(logb) if logb is not None else 0
        if legacy is not None:
            self._legacy_bytes = len(legacy)
        else:
            self._legacy_bytes = os.path.getsize(self.legacy_path) if os.path.exists(self.legacy_path) else 0
        self._loaded = True
        if (snap_h is not None and not snap_h.ok) or (log_h is not None and not log_h.ok):
            # Without a trusted generation the log cannot be paired with the
            # snapshot, and either one alone may resurrect deleted keys.
            lost = max(1, (self._snap_bytes + self._log_bytes) // SLOT)
            log.warning("index %s: a snapshot or log header is corrupt; starting with an empty index "
                        "(%d slot(s) dropped)", self.directory, lost)
            self._must_reset = True
            return [], lost

        tables = _Tables()
        parts: list[_Ops] = []
        bad = 0
        self._gen = snap_h.gen if snap_h is not None else 0
        if snap is not None:
            ops, b, _ = self._parse_slots(snap, tables)
            parts.append(ops)
            bad += b
            self._snap_records = len(ops) + b
        elif legacy:
            ops, b = self._parse_legacy(legacy, tables)
            parts.append(ops)
            bad += b
            self._snap_records = len(ops) + b
        if log_h is not None and log_h.gen == self._gen:
            ops, b, local = self._parse_slots(logb, tables)
            parts.append(ops)
            bad += b
            self._log_records = len(ops) + b
            self._log_usable = True
            self._prefix_ids, self._layout_ids, self._next_prefix, self._next_layout, self._log_clean = local
        elif logb is not None:
            log.info("index %s: the log (generation %s) is not the snapshot's (%s): a snapshot "
                     "interrupted after its rename; log ignored", self.directory,
                     log_h.gen if log_h else None, self._gen)
        for fields, g in tables.prefix_ids.items():
            if g >= 0:
                self._table_slots[fields] = _def_span(_prefix_payload(fields))
        for lay, g in tables.layout_ids.items():
            if g >= 0:
                self._table_slots[lay] = _def_span(_layout_payload(lay))
                self._valid_layouts[lay] = tables.layouts[g]
        ops = _Ops.concat(parts)
        if len(ops):
            self._seq = max(self._seq, int(ops.seq.max()))
        return self._build(self._live(ops), tables), bad

    def _reset_state(self) -> None:
        self.close_fd()
        self._gen = 0
        self._must_reset = False
        self._log_usable = False
        self._prefix_ids, self._layout_ids = {}, {}
        self._next_prefix = self._next_layout = 0
        self._snap_records = self._log_records = 0

    def _parse_slots(self, buf: bytes, tables: _Tables):
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
        rows = np.frombuffer(body, _SLOT_DTYPE)
        ok = _slot_checks(_words(body)) == rows["check"]
        bad += int(whole - np.count_nonzero(ok))
        tag = rows["tag"]
        span = rows["span"]

        # Table entries: few, decoded one by one.
        local_prefix: dict[int, int] = {}   # id in this file -> global id (-1: unusable)
        local_layout: dict[int, int] = {}
        prefix_ids: dict[tuple, int] = {}
        layout_ids: dict[tuple, int] = {}
        max_prefix = max_layout = -1
        for i in np.flatnonzero(ok & ((tag == _DEF_PREFIX) | (tag == _DEF_LAYOUT))).tolist():
            ident = int(rows["prefix"][i])
            is_prefix = tag[i] == _DEF_PREFIX
            if is_prefix:
                max_prefix = max(max_prefix, ident)
            else:
                max_layout = max(max_layout, ident)
            payload = self._gather(body, ok, tag, span, i)
            if payload is None:
                if i + int(span[i]) > whole:
                    torn = True       # the write of this entry was cut short
                    end = min(end, i)
                elif all(ok[i:i + int(span[i])]):
                    bad += 1          # else a slot of it failed its check and is counted already
                continue
            try:
                fields = _parse_prefix(payload) if is_prefix else _parse_layout(payload)
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

        narrow = ok & (tag == _PUT) & (span == 1)
        n_defs = len(local_prefix) + len(local_layout)
        if np.count_nonzero(narrow) + n_defs == whole and n_defs == np.count_nonzero(ok & (span == 1) & (
                (tag == _DEF_PREFIX) | (tag == _DEF_LAYOUT))):
            # The usual snapshot: one-slot table entries and one-slot puts, all intact.
            is_rec = narrow
            wide_head = np.zeros_like(ok)
        else:
            is_narrow = (tag == _PUT) | (tag == _DEL)
            is_wide_tag = (tag == _PUT_WIDE) | (tag == _DEL_WIDE)
            is_rec = ok & (is_narrow | is_wide_tag)
            narrow = is_rec & is_narrow & (span == 1)
            wide_head = is_rec & is_wide_tag & (span == 2)
            bad += int(np.count_nonzero(is_rec & ~narrow & ~wide_head))     # a wrong span
            other = ok & ~is_rec & (tag != _DEF_PREFIX) & (tag != _DEF_LAYOUT) & (tag != _CONT)
            bad += int(np.count_nonzero(other))     # intact, but no record, table entry or continuation
        if wide_head.any():
            cont = np.zeros_like(ok)
            cont[:-1] = ok[1:] & (tag[1:] == _CONT) & (span[1:] == 1)
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

        idx = np.flatnonzero(usable)
        if idx.shape[0] and idx[-1] - idx[0] + 1 == idx.shape[0]:
            r = rows[idx[0]:idx[-1] + 1]    # the usual file: tables, then only records; no copy
        else:
            r = rows[idx]
        is_wide = wide_head[idx]
        ops = _Ops(0, wide=bool(is_wide.any()))
        if ops.hi is not None:
            ops.hi = np.zeros((idx.shape[0], 16), np.uint8)
            ops.hi[is_wide] = rows["hash"][idx[is_wide] + 1]
        t = r["tag"]
        ops.is_put = (t == _PUT) | (t == _PUT_WIDE)
        pmap = np.full(max(local_prefix, default=-1) + 2, -1, np.int64)   # last entry: "no such id"
        for k, g in local_prefix.items():
            pmap[k] = g
        lmap = np.full(max(local_layout, default=-1) + 2, -1, np.int64)
        for k, g in local_layout.items():
            lmap[k] = g
        ops.prefix = pmap[np.minimum(r["prefix"], pmap.shape[0] - 1)]
        ops.layout = np.where(ops.is_put, lmap[np.minimum(r["layout"], lmap.shape[0] - 1)], -1)
        ops.ndig = r["ndig"]
        ops.lo = r["hash"]
        ext = r["ext"]
        ops.offset = (ext & np.uint64((1 << _OFF_BITS) - 1)) * np.uint64(PAGE)
        ops.phys = (ext >> np.uint64(_OFF_BITS)) * np.uint64(PAGE)
        ops.seq = r["seq"]
        ops.csum = r["csum"]
        good = self._valid_ops(ops, is_wide, tables)
        bad += int(idx.shape[0] - np.count_nonzero(good)) + int(torn)
        local = (prefix_ids, layout_ids, max_prefix + 1, max_layout + 1, SLOT * (1 + end))
        return (ops if good.all() else ops.take(np.flatnonzero(good))), bad, local

    @staticmethod
    def _gather(body: bytes, ok, tag, span, i: int) -> Optional[bytes]:
        """The payload of the table entry whose first slot is ``i``, or None if incomplete."""
        n = int(span[i])
        if n < 1 or i + n > tag.shape[0]:
            return None
        parts = [body[i * SLOT + _DEF_HEAD.size:(i + 1) * SLOT]]
        for j in range(1, n):
            s = i + j
            if not ok[s] or tag[s] != _CONT or span[s] != j:
                return None
            parts.append(body[s * SLOT + _CONT_HEAD.size:(s + 1) * SLOT])
        payload = b"".join(parts)
        (length,) = struct.unpack_from("<I", payload)
        return payload[4:4 + length] if length <= len(payload) - 4 else None

    @staticmethod
    def _valid_ops(ops: _Ops, is_wide: np.ndarray, tables: _Tables) -> np.ndarray:
        """Which operations name a possible key (and, for puts, a possible extent)."""
        good = ops.prefix >= 0
        if not len(ops):
            return good
        nd = ops.ndig.astype(np.int64)
        good &= np.where(is_wide, (nd > _NARROW) & (nd <= 2 * _NARROW), (nd >= 1) & (nd <= _NARROW))
        strlen = np.array([p.strlen for p in tables.prefixes] + [0], np.int64)
        good &= strlen[ops.prefix] + nd <= MAX_KEY_STRING
        # A hash may have no more significant digits than its recorded length.
        short = np.flatnonzero(good & ~is_wide & (nd < _NARROW))
        if short.size:
            good[short] &= _leading_zero_nibbles(ops.lo[short]) >= _NARROW - nd[short]
        w = np.flatnonzero(good & is_wide)
        if w.size:
            both = np.concatenate([ops.hi[w], ops.lo[w]], axis=1)
            good[w] &= _leading_zero_nibbles(both) >= 2 * _NARROW - nd[w]
        # phys is below 2**36, so float64 compares exactly wherever it can pass.
        need = np.array([float(min(v.nbytes, 1 << 63)) for v in tables.layouts] + [0.0], np.float64)
        lay_ok = ops.layout >= 0
        ext_ok = lay_ok & (ops.phys > 0) & (ops.phys.astype(np.float64) >= need[ops.layout])
        good &= ~ops.is_put | ext_ok
        return good

    def _parse_legacy(self, buf: bytes, tables: _Tables) -> tuple[_Ops, int]:
        """Operations of a JSON-lines index of version 1 (a one-time migration: a Python loop)."""
        lines = buf.split(b"\n")
        bad = 0
        if lines[-1] == b"":
            lines.pop()
        else:
            bad += 1   # a torn last line
            lines.pop()
        recs = []
        for i, line in enumerate(lines):
            rec = _legacy_decode(line)
            if rec is None:
                bad += 1
                continue
            if i == 0 and rec.get("magic") == _LEGACY_MAGIC:
                continue
            try:
                op = rec.get("op")
                key = CacheEngineKey.from_string(rec["key"])
                seq = int(rec.get("seq", 0))
                if op == "put":
                    lay = tables.layout((tuple(int(d) for d in rec["shape"]), str(rec["dtype"]), str(rec["fmt"])))
                    nbytes, phys, off, csum = int(rec["n"]), int(rec["phys"]), int(rec["off"]), int(rec["csum"], 16)
                    if lay < 0 or nbytes != tables.layouts[lay].nbytes:
                        raise ValueError("unknown layout, or nbytes does not match shape and dtype")
                    if not (nbytes <= phys <= MAX_PHYS_SIZE and phys % PAGE == 0 and 0 <= off <= MAX_OFFSET
                            and off % PAGE == 0 and 0 <= seq <= _MAX_U64 and 0 <= csum <= _MAX_U64):
                        raise ValueError("impossible extent, seq or checksum")
                elif op == "del":
                    lay, phys, off, csum = -1, 0, 0, 0
                    if not 0 <= seq <= _MAX_U64:
                        raise ValueError("impossible seq")
                else:
                    raise ValueError(f"unknown op {op!r}")
                g = tables.prefix((key.fmt, key.model_name, key.world_size, key.worker_id))
                if g < 0:
                    raise ValueError("key prefix unusable")
                recs.append((op == "put", g, key.chunk_hash, lay, phys, off, seq, csum))
            except (ValueError, KeyError, TypeError, AttributeError, GdsKvCacheError) as e:
                log.warning("JSON index %s line %d unusable (%s); skipped", self.legacy_path, i + 1, e)
                bad += 1
        wide = any(len(r[2]) > _NARROW for r in recs)
        ops = _Ops(len(recs), wide=wide)
        for i, (is_put, g, h, lay, phys, off, seq, csum) in enumerate(recs):
            raw = int(h, 16).to_bytes(32, "big")
            ops.is_put[i], ops.prefix[i], ops.ndig[i] = is_put, g, len(h)
            ops.lo[i] = np.frombuffer(raw[16:], np.uint8)
            if wide:
                ops.hi[i] = np.frombuffer(raw[:16], np.uint8)
            ops.layout[i], ops.phys[i], ops.offset[i], ops.seq[i], ops.csum[i] = lay, phys, off, seq, csum
        return ops, bad

    @staticmethod
    def _live(ops: _Ops) -> _Ops:
        """The last operation of each key, where it is a put, in ``seq`` order."""
        n = len(ops)
        if n == 0:
            return ops
        ident = [(ops.prefix.astype(np.uint64) << np.uint64(8)) | ops.ndig.astype(np.uint64)]
        ident += _u64_cols(ops.lo)
        if ops.hi is not None:
            ident += _u64_cols(ops.hi)
        fp = _mix(ident)
        order = np.argsort(fp)
        sfp = fp[order]
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(sfp[1:], sfp[:-1], out=first[1:])
        if first.all():
            # Every key once: the common case, nothing to merge.
            live = ops if ops.is_put.all() else ops.take(np.flatnonzero(ops.is_put))
        else:
            starts = np.flatnonzero(first)
            # A key's last operation is the one latest in the files.
            win = np.maximum.reduceat(order, starts)
            pairs = np.flatnonzero(~first[1:])
            a, b = order[pairs], order[pairs + 1]
            differ = np.zeros(pairs.shape[0], bool)
            for c in ident:
                differ |= c[a] != c[b]
            if differ.any():
                # Distinct keys with one fingerprint (about 2**-64 a pair): settle exactly.
                win = IndexLog._settle_collisions(order, sfp, starts, win, ident, np.unique(sfp[pairs[differ]]))
            win.sort()
            live = ops.take(win[ops.is_put[win]])
        seq = live.seq
        if seq.shape[0] > 1 and not (seq[1:] >= seq[:-1]).all():
            live = live.take(np.argsort(seq, kind="stable"))
        return live

    @staticmethod
    def _settle_collisions(order, sfp, starts, win, ident, fps) -> np.ndarray:
        keep = np.ones(win.shape[0], bool)
        extra = []
        for f in fps.tolist():
            keep[int(np.searchsorted(sfp[starts], f))] = False
            final: dict = {}
            for i in sorted(order[sfp == f].tolist()):
                final[tuple(int(c[i]) for c in ident)] = i
            extra += final.values()
        return np.concatenate([win[keep], np.array(extra, win.dtype)])

    @staticmethod
    def _build(ops: _Ops, tables: _Tables) -> list[DiskEntry]:
        """The ``DiskEntry`` of each of ``ops`` (all valid puts), made in bulk.

        Notes
        -----
        Keys are made without ``CacheEngineKey.__init__``: their prefix was
        validated once per table entry and their hash is hex by construction,
        so the per-key checks (about 5 us a key, more than all the rest of
        the load) would only repeat themselves. Writing a new key's instance
        dict is the cheapest way to fill it (a frozen dataclass only guards
        setattr); the key equals and hashes as the constructor's would, and
        its dict is smaller than the one the constructor leaves.
        """
        n = len(ops)
        out: list[DiskEntry] = []
        if n == 0:
            return out
        new = object.__new__
        templates = [dict(zip(("fmt", "model_name", "world_size", "worker_id"), p.fields)) for p in tables.prefixes]
        by_prefix = np.empty(len(templates) + 1, object)
        for i, t in enumerate(templates):
            by_prefix[i] = t     # one by one: NumPy would unpack a sequence
        by_layout = np.empty(len(tables.layouts) + 1, object)
        for i, v in enumerate(tables.layouts):
            by_layout[i] = v
        was_enabled = gc.isenabled()
        gc.disable()   # millions of new objects would set off repeated full collections
        try:
            for s in range(0, n, _BUILD_BLOCK):
                sl = slice(s, s + _BUILD_BLOCK)
                pid = ops.prefix[sl]
                lid = ops.layout[sl]
                m = pid.shape[0]
                if ops.hi is None:
                    hashes = _hex_strings(ops.lo[sl], ops.ndig[sl])
                else:
                    hashes = _hex_strings(np.concatenate([ops.hi[sl], ops.lo[sl]], axis=1), ops.ndig[sl])
                keys = list(map(new, repeat(CacheEngineKey, m)))
                if (pid == pid[0]).all():
                    t = templates[int(pid[0])]
                    for k, h in zip(keys, hashes):
                        d = k.__dict__
                        d.update(t)
                        d["chunk_hash"] = h
                else:
                    for k, t, h in zip(keys, by_prefix[pid].tolist(), hashes):
                        d = k.__dict__
                        d.update(t)
                        d["chunk_hash"] = h
                if (lid == lid[0]).all():
                    v = tables.layouts[int(lid[0])]
                    nb, sh, dt, fm = repeat(v.nbytes), repeat(v.shape), repeat(v.dtype), repeat(v.fmt)
                else:
                    vs = by_layout[lid].tolist()
                    nb, sh = [v.nbytes for v in vs], [v.shape for v in vs]
                    dt, fm = [v.dtype for v in vs], [v.fmt for v in vs]
                out.extend(map(DiskEntry, keys, ops.offset[sl].tolist(), nb, ops.phys[sl].tolist(), sh, dt, fm,
                               ops.csum[sl].tolist(), ops.seq[sl].tolist()))
        finally:
            if was_enabled:
                gc.enable()
        return out

    def _ensure_loaded(self) -> None:
        if self._closed:
            raise ClosedError("index log is closed")
        if not self._loaded:
            self.load()

    # -- writing -------------------------------------------------------------------------------
    def next_seq(self) -> int:
        """Reserve and return the next sequence number (above every one recorded)."""
        self._ensure_loaded()
        self._seq += 1
        return self._seq

    def append(self, puts: Sequence[DiskEntry] = (), dels: Sequence[CacheEngineKey] = ()) -> None:
        """Record ``puts`` then ``dels`` with one ``os.write``, each with a fresh ``seq``.

        Raises
        ------
        IndexEntryError
            An entry has an impossible extent, shape, dtype or fmt; nothing is written.
        OSError
            The write failed; the log is cut back to its previous size and
            nothing is recorded.

        Notes
        -----
        Sets ``e.seq`` of every put once the write is done. Not fsynced (see
        the class notes). New key prefixes and layouts add a table entry
        (a slot or a few) in front of the records, in the same write.
        """
        self._ensure_loaded()
        if not puts and not dels:
            return
        lays = [self._check_entry(e) for e in puts]
        for k in dels:
            if not isinstance(k, CacheEngineKey):
                raise IndexEntryError(f"dels must hold CacheEngineKey objects, got {type(k).__name__}")
        if self._must_reset:
            self.snapshot([])
        self._open_log()
        saved = (dict(self._prefix_ids), dict(self._layout_ids), self._next_prefix, self._next_layout)
        buf = bytearray()
        seq = self._seq
        for e, lay in zip(puts, lays):
            pid = self._prefix_id(e.key, buf)
            lid = self._layout_id(lay, buf)
            seq += 1
            self._record(buf, True, e.key.chunk_hash, pid, lid, e.offset, e.phys_size, seq, e.checksum)
        for k in dels:
            seq += 1
            self._record(buf, False, k.chunk_hash, self._prefix_id(k, buf), 0, 0, 0, seq, 0)
        _seal(buf)
        before = self._log_bytes
        try:
            mv = memoryview(buf)
            w = os.write(self._fd, mv)
            while w < len(mv):      # a short write (rare for files): finish it, slots stay whole
                mv = mv[w:]
                w = os.write(self._fd, mv)
        except BaseException:
            (self._prefix_ids, self._layout_ids, self._next_prefix, self._next_layout) = saved
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                self.close_fd()     # the next append reopens it and cuts it back to whole slots
                self._log_clean = before
            raise
        for i, e in enumerate(puts):
            e.seq = self._seq + 1 + i
        self._seq = seq
        self._log_bytes += len(buf)
        self._log_records += len(puts) + len(dels)

    def _check_entry(self, e: DiskEntry) -> tuple:
        """Validate one entry for writing; return its normalised layout tuple."""
        k = e.key
        if not isinstance(k, CacheEngineKey):
            raise IndexEntryError(f"an entry's key must be a CacheEngineKey, got {type(k).__name__}")
        try:
            lay = (tuple(e.shape), e.dtype, e.fmt)
            v = self._valid_layouts.get(lay)
            if v is None:
                v = self._valid_layouts[lay] = _Layout(lay)
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
        if not (isinstance(e.checksum, int) and 0 <= e.checksum <= _MAX_U64):
            raise IndexEntryError(f"entry {k.to_string()}: checksum {e.checksum!r} is not a 64-bit unsigned int")
        return (v.shape, v.dtype, v.fmt)

    def _open_log(self) -> None:
        """Make the log on disk current and open it for appends."""
        if self._fd is not None:
            return
        if self._log_usable:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            size = os.fstat(fd).st_size
            clean = min(self._log_clean, SLOT + (size - SLOT) // SLOT * SLOT)
            if size >= SLOT:
                if clean != size:
                    # Cut off a torn tail: part of a slot would misalign every later
                    # slot, and a record cut short would be read with the next one.
                    os.ftruncate(fd, clean)
                self._fd = fd
                self._log_bytes = clean
                return
            os.close(fd)
        self._new_log()

    def _new_log(self) -> None:
        """Start an empty log of the current generation (temp file, fsync, rename)."""
        self.close_fd()
        tmp = self.log_path + ".tmp"
        n = _write_file(tmp, [_header_slot(_KIND_LOG, self._gen)])
        os.replace(tmp, self.log_path)
        _fsync_dir(self.directory)
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        self._log_usable = True
        self._log_clean = 1 << 62
        self._log_bytes = n
        self._log_records = 0
        self._prefix_ids, self._layout_ids = {}, {}
        self._next_prefix = self._next_layout = 0

    def _prefix_id(self, k: CacheEngineKey, buf: bytearray) -> int:
        fields = (k.fmt, k.model_name, k.world_size, k.worker_id)
        i = self._prefix_ids.get(fields)
        if i is None:
            i = self._prefix_ids[fields] = self._next_prefix
            self._next_prefix += 1
            payload = _prefix_payload(fields)
            buf += _def_slots(_DEF_PREFIX, i, payload)
            self._table_slots[fields] = _def_span(payload)
        return i

    def _layout_id(self, lay: tuple, buf: bytearray) -> int:
        i = self._layout_ids.get(lay)
        if i is None:
            i = self._layout_ids[lay] = self._next_layout
            self._next_layout += 1
            payload = _layout_payload(lay)
            buf += _def_slots(_DEF_LAYOUT, i, payload)
            self._table_slots[lay] = _def_span(payload)
        return i

    @staticmethod
    def _record(buf: bytearray, put: bool, h: str, pid: int, lid: int, off: int, phys: int, seq: int,
                csum: int) -> None:
        ext = off // PAGE | (phys // PAGE) << _OFF_BITS
        if len(h) <= _NARROW:
            buf += _REC.pack(_PUT if put else _DEL, len(h), 1, 0, pid, lid, ext, seq, csum,
                             int(h, 16).to_bytes(16, "big"))
        else:
            raw = int(h, 16).to_bytes(32, "big")
            buf += _REC.pack(_PUT_WIDE if put else _DEL_WIDE, len(h), 2, 0, pid, lid, ext, seq, csum, raw[16:])
            buf += _REC.pack(_CONT, 0, 1, 0, 0, 0, 0, 0, 0, raw[:16])

    def snapshot(self, entries: Iterable[DiskEntry]) -> None:
        """Make the index equal to exactly ``entries``, atomically and crash-safely.

        Raises
        ------
        IndexEntryError
            An entry cannot be recorded; nothing on disk changes.
        IndexFormatError
            Called before :meth:`load` on a directory whose index is foreign
            or newer; nothing on disk changes.

        Notes
        -----
        Order: new snapshot to ``.tmp``, fsync, rename, fsync the directory;
        then a fresh log of the new generation (temp file and rename too);
        then the JSON index of earlier versions, if any, is deleted. Entries
        are written in ``seq`` order and keep their ``seq``. Costs about as
        much as :meth:`load`: each entry's fields are read in Python.
        """
        if self._closed:
            raise ClosedError("index log is closed")
        if not self._loaded:
            self._check_headers()
        entries = entries if isinstance(entries, list) else list(entries)
        was_enabled = gc.isenabled()
        gc.disable()   # the per-entry tuples would set off collections that rescan every entry
        try:
            blocks, top = self._encode_snapshot(entries)
        finally:
            if was_enabled:
                gc.enable()
        gen = 0
        while gen == 0:
            gen = int.from_bytes(os.urandom(8), "little")
        tmp = self.snap_path + ".tmp"
        size = _write_file(tmp, [_header_slot(_KIND_SNAP, gen)] + blocks)
        os.replace(tmp, self.snap_path)
        _fsync_dir(self.directory)
        # The new snapshot is durable: from here the old log no longer matches and is ignored.
        self._gen = gen
        self._snap_bytes = size
        self._snap_records = len(entries)
        self._must_reset = False
        self._new_log()
        if os.path.exists(self.legacy_path):
            os.unlink(self.legacy_path)
            _fsync_dir(self.directory)
        self._legacy_bytes = 0
        self._seq = max(self._seq, top)
        self._loaded = True

    def _check_headers(self) -> None:
        """Refuse (IndexFormatError) to replace an index this library does not read."""
        for path, kind in ((self.snap_path, _KIND_SNAP), (self.log_path, _KIND_LOG)):
            try:
                with open(path, "rb") as f:
                    head = f.read(SLOT)
            except FileNotFoundError:
                continue
            if head:
                _parse_header(path, head, kind)
        if not os.path.exists(self.snap_path):
            legacy = _read(self.legacy_path)
            if legacy is not None:
                _check_legacy_header(self.legacy_path, legacy)

    def _encode_snapshot(self, entries: list[DiskEntry]) -> tuple[list, int]:
        """The snapshot body (tables, then records in ``seq`` order) and the largest seq.

        Validates every entry before anything is written.

        Notes
        -----
        Every per-entry step is a ``map`` of an ``attrgetter`` or a dict
        lookup, so its loop runs in C; Python code runs once per distinct
        key prefix or layout.
        """
        n = len(entries)
        keys = list(map(_KEY, entries))
        if not all(issubclass(t, CacheEngineKey) for t in set(map(type, keys))):
            raise IndexEntryError("every entry's key must be a CacheEngineKey")
        prefixes = list(map(_PREFIX, keys))
        prefix_ids = {f: i for i, f in enumerate(dict.fromkeys(prefixes))}
        pid = np.fromiter(map(prefix_ids.__getitem__, prefixes), np.uint32, count=n)
        given = list(map(_LAYOUT, entries))          # shape may be a torch.Size or a list
        try:
            sample = dict(zip(given, entries))       # one entry of each distinct layout
        except TypeError:                            # an unhashable shape (a list): normalise first
            given = [(tuple(s), d, f) for s, d, f in given]
            sample = dict(zip(given, entries))
        layouts: list[tuple] = []
        layout_ids: dict[tuple, int] = {}
        given_ids: dict[tuple, int] = {}
        for g, e in sample.items():
            lay = self._check_entry(e)               # the layout once; every extent is checked below
            q = layout_ids.get(lay)
            if q is None:
                q = layout_ids[lay] = len(layouts)
                layouts.append(lay)
            given_ids[g] = q
        lid = np.fromiter(map(given_ids.__getitem__, given), np.uint32, count=n)

        def column(get, name: str) -> np.ndarray:
            try:
                return np.fromiter(map(get, entries), np.uint64, count=n)
            except (OverflowError, TypeError, ValueError):
                raise IndexEntryError(f"an entry's {name} is not a 64-bit unsigned int") from None

        offset = column(_OFFSET, "offset")
        phys = column(_PHYS, "phys_size")
        nbytes = column(_NBYTES, "nbytes")
        csum = column(_CSUM, "checksum")
        seq = column(_SEQ, "seq")
        lay_nbytes = np.array([min(self._valid_layouts[lay].nbytes, _MAX_U64) for lay in layouts], np.uint64)
        page = np.uint64(PAGE)
        wrong = ((nbytes != lay_nbytes[lid]) | (phys < nbytes) | (phys % page != 0)
                 | (phys > np.uint64(MAX_PHYS_SIZE)) | (offset % page != 0) | (offset > np.uint64(MAX_OFFSET)))
        if wrong.any():
            self._check_entry(entries[int(np.flatnonzero(wrong)[0])])   # raises, naming the entry
        hashes = list(map(_HASH, keys))
        ndig = np.fromiter(map(len, hashes), np.uint8, count=n)
        is_wide = ndig > _NARROW
        if (ndig == _NARROW).all():
            lo, hi = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(n, 16), None
        else:
            both = np.frombuffer(b"".join(int(h, 16).to_bytes(32, "big") for h in hashes), np.uint8).reshape(n, 32)
            lo, hi = both[:, 16:], both[:, :16]
        order = np.argsort(seq, kind="stable")

        tables = bytearray()
        for fields, p in prefix_ids.items():
            payload = _prefix_payload(fields)
            tables += _def_slots(_DEF_PREFIX, p, payload)
            self._table_slots[fields] = _def_span(payload)
        for q, lay in enumerate(layouts):
            payload = _layout_payload(lay)
            tables += _def_slots(_DEF_LAYOUT, q, payload)
            self._table_slots[lay] = _def_span(payload)
        blocks: list = []
        if tables:
            _seal(tables)
            blocks.append(tables)
        ext = offset // page | (phys // page) << np.uint64(_OFF_BITS)
        for s in range(0, n, 4 * _BUILD_BLOCK):
            o = order[s:s + 4 * _BUILD_BLOCK]
            w = is_wide[o]
            # Slot of each entry: one each, two for a wide hash.
            pos = np.arange(o.shape[0]) + np.concatenate([[0], np.cumsum(w)[:-1]]).astype(np.int64)
            rows = np.zeros(o.shape[0] + int(np.count_nonzero(w)), _SLOT_DTYPE)
            r = rows[pos] if w.any() else rows
            r["tag"] = np.where(w, _PUT_WIDE, _PUT)
            r["ndig"] = ndig[o]
            r["span"] = np.where(w, 2, 1)
            r["prefix"] = pid[o]
            r["layout"] = lid[o]
            r["ext"] = ext[o]
            r["seq"] = seq[o]
            r["csum"] = csum[o]
            r["hash"] = lo[o]
            if w.any():
                rows[pos] = r
                cont = pos[w] + 1
                rows["tag"][cont] = _CONT
                rows["span"][cont] = 1
                rows["hash"][cont] = hi[o[w]]
            _seal(rows)
            blocks.append(rows.view(np.uint8))
        return blocks, int(seq.max()) if n else 0

    # -- closing --------------------------------------------------------------------------------
    def close_fd(self) -> None:
        """Close the append descriptor (reopened by the next append)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the log; later calls raise ``ClosedError``."""
        self.close_fd()
        self._closed = True
