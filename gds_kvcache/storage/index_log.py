"""The disk index's on-disk format: fixed 64-byte binary records, a snapshot plus a log.

Files (all in the cache directory, all named ``kvcache.index*``):

``kvcache.index.snap``
    The state at the last :meth:`IndexLog.snapshot`: a header, the interning
    tables, then one put record per live chunk, in ``seq`` order.
``kvcache.index.log``
    Puts and deletes since that snapshot, appended one batch per ``os.write``.
    Its header carries the snapshot's *generation* (a random 64-bit number);
    a log whose generation differs from the snapshot's is stale and ignored.
``kvcache.index.snap.tmp``, ``kvcache.index.log.tmp``
    Files being written; never read, overwritten by the next snapshot.
``kvcache.index``
    The JSON-lines index of earlier versions; read (migrated) when there is
    no binary snapshot yet, deleted by the first binary snapshot.

Every file is a sequence of 64-byte *slots*: slot 0 is the header, and every
slot ends with a 64-bit check of its first 56 bytes, so a torn or altered
slot is found and skipped without losing the framing of the ones after it.
A put of a key whose ``chunk_hash`` has at most 32 hex digits (the 128-bit
prefix hash the library makes) takes one slot; a wider hash (up to 64 digits)
takes two. The key's fmt/model/world_size/worker_id and the chunk's
shape/dtype/fmt are interned in per-file tables (definition records) and
referred to by number, so every record of the common case has a fixed layout
and a snapshot or log of millions of records is decoded with NumPy in bulk.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import struct
from dataclasses import dataclass
from itertools import repeat
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ClosedError, GdsKvCacheError, IndexFormatError
from ..key import MAX_KEY_STRING, CacheEngineKey
from ..memory.format import MemoryFormat, str_to_dtype
from ..units import PAGE

__all__ = ["INDEX_VERSION", "INDEX_MAGIC", "SLOT", "TABLE_ALLOWANCE", "DiskEntry", "IndexLog",
           "IndexEntryError", "SNAP_NAME", "LOG_NAME", "LEGACY_NAME"]

log = logging.getLogger(__name__)

#: Format version of the binary files. Version 1 was the JSON-lines log of
#: ``disk_index.py`` (migrated on load); versions are counted across both.
INDEX_VERSION = 2
INDEX_MAGIC = b"GKVINDEX"
#: Bytes of one record slot. Every field offset below depends on it.
SLOT = 64
#: Default allowance for the interning tables in :meth:`IndexLog.size_of`:
#: room for 64 slots (e.g. 4 model/worker prefixes of the longest names plus
#: 40 chunk shapes), more than one directory normally needs.
TABLE_ALLOWANCE = 64 * SLOT

SNAP_NAME = "kvcache.index.snap"
LOG_NAME = "kvcache.index.log"
LEGACY_NAME = "kvcache.index"
_LEGACY_MAGIC = "gds_kvcache-index"
_LEGACY_VERSION = 1

_KIND_SNAP = 1
_KIND_LOG = 2

# Record tags (first byte of a slot).
_PUT = ord("P")        # put, hash <= 32 hex digits, 1 slot
_DEL = ord("D")        # delete, hash <= 32 hex digits, 1 slot
_PUT_WIDE = ord("W")   # put, hash of 33-64 digits: head slot + 1 continuation
_DEL_WIDE = ord("E")   # delete, hash of 33-64 digits: head slot + 1 continuation
_DEF_PREFIX = ord("K")  # table entry: (fmt, model_name, world_size, worker_id)
_DEF_LAYOUT = ord("L")  # table entry: (shape, dtype, fmt)
_CONT = ord("C")       # continuation slot of a multi-slot record

# One slot: tag, ndig (hex digits of chunk_hash), span (slots of the record;
# in a continuation, its index), prefix id, layout id, phys_size in pages,
# offset, seq, checksum, the low 128 bits of the hash (big-endian), check.
_SLOT_DTYPE = np.dtype([("tag", "u1"), ("ndig", "u1"), ("span", "<u2"), ("prefix", "<u4"), ("layout", "<u4"),
                        ("phys", "<u4"), ("offset", "<u8"), ("seq", "<u8"), ("csum", "<u8"),
                        ("hash", "u1", (16,)), ("check", "<u8")])
assert _SLOT_DTYPE.itemsize == SLOT
_REC = struct.Struct("<BBHIIIQQQ16s")        # the first 56 bytes of a record slot
_HEAD = struct.Struct("<8sIIQI28x")          # magic, version, kind, generation, slot size
_DEF_HEAD = struct.Struct("<BBHI")           # tag, 0, span, table id; then 48 payload bytes
_CONT_HEAD = struct.Struct("<BBH")           # tag C, 0, index; then 52 payload bytes
_BODY = SLOT - 8
_DEF_FIRST = _BODY - _DEF_HEAD.size          # 48
_CONT_BODY = _BODY - _CONT_HEAD.size         # 52

_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1
_NARROW = 32                                 # hex digits that fit one slot

# Multiply-xorshift check of a slot's first seven 64-bit words. Each step is a
# bijection of the word it takes in, so a change confined to any one 8-byte
# word (every single-bit flip) always changes the 64-bit result; other changes
# escape with probability about 2**-64. A CRC32 per record would need a
# Python call per record; this runs as a few NumPy passes.
_SEED = np.uint64(0x6A09E667F3BCC908)
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)
_BLOCK = 1 << 15                             # rows per NumPy pass (2 MiB of slots: stays in cache)
_BUILD_BLOCK = 1 << 16                       # entries built per round (bounds temporaries)


class IndexEntryError(GdsKvCacheError, ValueError):
    """An entry handed to :class:`IndexLog` cannot be recorded (a bug in the caller)."""


@dataclass(slots=True)
class DiskEntry:
    """Where one chunk lives in the pool, and what it is.

    ``readers`` and ``doomed`` are runtime state of the disk tier and are
    never written to the index.
    """

    key: CacheEngineKey
    offset: int             # logical pool offset, 4 KiB-aligned
    nbytes: int             # logical bytes (> 0)
    phys_size: int          # nbytes rounded up to 4 KiB (or more), a 4 KiB multiple
    shape: tuple            # ints >= 0
    dtype: str              # as memory.format.dtype_to_str gives
    fmt: str                # MemoryFormat name
    checksum: int           # 64-bit unsigned
    seq: int = 0            # order of the put (recency); assigned by IndexLog.append
    readers: int = 0        # runtime only, never persisted
    doomed: bool = False    # runtime only, never persisted


# -- checks ---------------------------------------------------------------------
def _slot_checks(words: np.ndarray) -> np.ndarray:
    """The check of each slot of ``words`` (``(n, 8)`` little-endian uint64)."""
    n = words.shape[0]
    out = np.empty(n, np.uint64)
    x = np.empty(min(n, _BLOCK), np.uint64)
    for s in range(0, n, _BLOCK):
        w = words[s:s + _BLOCK]
        m = w.shape[0]
        h = out[s:s + m]
        t = x[:m]
        h[:] = _SEED
        for i in range(7):
            np.multiply(w[:, i], _K1, out=t)
            t ^= t >> 31
            h ^= t
            h *= _K2
        h ^= h >> 29
        h *= _K3
        h ^= h >> 32
    return out


def _seal(buf) -> None:
    """Fill in the check word of every slot of ``buf`` (a writable buffer of whole slots)."""
    raw = buf.view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    words = raw.view("<u8").reshape(-1, 8)
    words[:, 7] = _slot_checks(words)


def _fingerprints(cols: Sequence[np.ndarray]) -> np.ndarray:
    """A 64-bit hash of each row of the uint64 columns ``cols`` (for grouping equal keys)."""
    h = np.full(cols[0].shape[0], _SEED, np.uint64)
    for c in cols:
        t = c * _K1
        t ^= t >> 31
        h ^= t
        h *= _K2
    h ^= h >> 29
    h *= _K3
    h ^= h >> 32
    return h


# -- table entries -----------------------------------------------------------------
def _pack_strs(*parts: bytes) -> bytes:
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


def _unpack_strs(payload: bytes, count: int) -> tuple[list[bytes], int]:
    out, pos = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        if pos + n > len(payload):
            raise ValueError("string runs past its record")
        out.append(payload[pos:pos + n])
        pos += n
    return out, pos


def _prefix_payload(p: tuple) -> bytes:
    fmt, model, ws, wid = p
    return _pack_strs(fmt.encode(), model.encode(), str(ws).encode(), str(wid).encode())


def _layout_payload(lay: tuple) -> bytes:
    shape, dtype, fmt = lay
    return _pack_strs(dtype.encode(), fmt.encode()) + struct.pack(f"<H{len(shape)}Q", len(shape), *shape)


def _def_slots(tag: int, ident: int, payload: bytes) -> bytes:
    """A table entry as whole slots (checks left zero for :func:`_seal`)."""
    payload = struct.pack("<I", len(payload)) + payload
    rest = max(0, len(payload) - _DEF_FIRST)
    span = 1 + -(-rest // _CONT_BODY)
    out = [_DEF_HEAD.pack(tag, 0, span, ident) + payload[:_DEF_FIRST].ljust(_DEF_FIRST, b"\0") + bytes(8)]
    for j in range(1, span):
        part = payload[_DEF_FIRST + (j - 1) * _CONT_BODY:_DEF_FIRST + j * _CONT_BODY]
        out.append(_CONT_HEAD.pack(_CONT, 0, j) + part.ljust(_CONT_BODY, b"\0") + bytes(8))
    return b"".join(out)


def _def_span(payload: bytes) -> int:
    rest = max(0, len(payload) + 4 - _DEF_FIRST)
    return 1 + -(-rest // _CONT_BODY)


def _parse_prefix(payload: bytes) -> tuple:
    (fmt, model, ws, wid), _ = _unpack_strs(payload, 4)
    if not (ws.isdigit() and wid.isdigit()):
        raise ValueError("world_size/worker_id not decimal")
    return (fmt.decode(), model.decode(), int(ws), int(wid))


def _parse_layout(payload: bytes) -> tuple:
    (dtype, fmt), pos = _unpack_strs(payload, 2)
    (ndim,) = struct.unpack_from("<H", payload, pos)
    shape = struct.unpack_from(f"<{ndim}Q", payload, pos + 2)
    return (tuple(shape), dtype.decode(), fmt.decode())


class _Prefix:
    """A validated key prefix: its fields and the length of its key string minus the hash."""

    __slots__ = ("fields", "strlen")

    def __init__(self, fields: tuple):
        fmt, model, ws, wid = fields
        k = CacheEngineKey(fmt, model, ws, wid, "0")   # validates once for every key that uses it
        self.fields = fields
        self.strlen = len(k.to_string()) - 1


class _Layout:
    """A validated (shape, dtype, fmt) and the byte count it implies."""

    __slots__ = ("shape", "dtype", "fmt", "nbytes")

    def __init__(self, lay: tuple):
        shape, dtype, fmt = lay
        if not isinstance(fmt, str) or fmt not in MemoryFormat.__members__:
            raise ValueError(f"unknown memory format {fmt!r}")
        itemsize = str_to_dtype(dtype).itemsize
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_U64 for d in shape):
            raise ValueError(f"shape {shape!r} has a dimension that is not a non-negative 64-bit int")
        self.shape, self.dtype, self.fmt = tuple(shape), dtype, fmt
        self.nbytes = math.prod(self.shape) * itemsize
        if self.nbytes <= 0:
            raise ValueError(f"shape {shape!r} of {dtype} holds no bytes")


class _Tables:
    """Prefixes and layouts met while loading, numbered across files."""

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
            except GdsKvCacheError:
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
                log.warning("index layout %r is unusable here (%s); records that use it are skipped", lay, e)
                g = -1
            else:
                g = len(self.layouts)
                self.layouts.append(v)
            self.layout_ids[lay] = g
        return g


# -- decoded operations --------------------------------------------------------------
class _Ops:
    """Put/delete operations of one file in file order, as columns."""

    __slots__ = ("is_put", "prefix", "ndig", "lo", "hi", "layout", "phys", "offset", "seq", "csum")

    def __init__(self, n: int = 0, wide: bool = False):
        self.is_put = np.zeros(n, bool)
        self.prefix = np.zeros(n, np.int64)      # global prefix id
        self.ndig = np.zeros(n, np.uint8)
        self.lo = np.zeros((n, 16), np.uint8)    # low 128 bits of the hash, big-endian
        self.hi = np.zeros((n, 16), np.uint8) if wide else None
        self.layout = np.zeros(n, np.int64)      # global layout id (puts)
        self.phys = np.zeros(n, np.uint64)       # bytes
        self.offset = np.zeros(n, np.uint64)
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
                o.hi = (np.concatenate([p.hi if p.hi is not None else np.zeros((len(p), 16), np.uint8)
                                        for p in parts]) if wide else None)
            else:
                setattr(o, f, np.concatenate([getattr(p, f) for p in parts]))
        return o


def _leading_zero_nibbles(b: np.ndarray) -> np.ndarray:
    """Leading zero hex digits of each row of big-endian bytes ``b`` (``(n, m)`` uint8)."""
    nib = np.empty((b.shape[0], 2 * b.shape[1]), np.uint8)
    nib[:, 0::2] = b >> 4
    nib[:, 1::2] = b & 15
    nz = nib != 0
    first = nz.argmax(axis=1)
    return np.where(nz.any(axis=1), first, nib.shape[1])


def _hex_strings(b: np.ndarray, ndig: np.ndarray) -> list:
    """The last ``ndig[i]`` hex digits of each row of big-endian bytes ``b``, as ``str``."""
    n, m = b.shape
    width = 2 * m
    # bytes.hex over a void view runs its loop in C: about twice as fast as
    # NumPy's fixed-width unicode -> str (and "S" views would drop trailing zeros).
    out = list(map(bytes.hex, np.ascontiguousarray(b).view(f"V{m}").ravel().tolist()))
    short = np.flatnonzero(ndig != width)
    if short.size:
        cut = (width - ndig[short].astype(np.int64)).tolist()
        for i, c in zip(short.tolist(), cut):
            out[i] = out[i][c:]
    return out



def _u64_cols(b: np.ndarray) -> list[np.ndarray]:
    """The two little-endian words of each row of ``(n, 16)`` bytes, without copying where possible."""
    w = b.view("<u8") if b.strides[-1] == 1 else np.ascontiguousarray(b).view("<u8")
    return [w[:, 0], w[:, 1]]


# -- files --------------------------------------------------------------------------
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
    """Check magic and version (raising, file untouched) and read the generation."""
    magic = buf[:len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC[:len(magic)] or (len(buf) >= len(INDEX_MAGIC) and magic != INDEX_MAGIC):
        raise IndexFormatError(
            f"index file {path} does not start with the gds_kvcache index magic {INDEX_MAGIC!r} "
            f"(found {bytes(buf[:8])!r}); it was not written by this library and is left untouched; "
            "move it away to start an empty index")
    if len(buf) < SLOT:
        return _Header(0, False)
    m, version, k, gen, slot = _HEAD.unpack_from(buf)
    if version != INDEX_VERSION:
        raise IndexFormatError(
            f"index file {path} is format version {version}; this library reads version {INDEX_VERSION} "
            f"(and migrates version {_LEGACY_VERSION}, the JSON-lines {LEGACY_NAME}); the files are left "
            "untouched: open the directory with the library that wrote them, or move the kvcache.index* "
            "files away to start an empty index")
    ok = (slot == SLOT and k == kind
          and int(_slot_checks(np.frombuffer(buf[:SLOT], "<u8").reshape(1, 8))[0])
          == struct.unpack_from("<Q", buf, SLOT - 8)[0])
    return _Header(gen, ok)


def _header_slot(kind: int, gen: int) -> bytearray:
    b = bytearray(_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, kind, gen, SLOT) + bytes(8))
    _seal(b)
    return b


def _check_legacy_header(path: str, buf: bytes) -> None:
    """Raise unless ``buf`` is a JSON-lines index of version 1 (or empty)."""
    if not buf:
        return
    first = buf.split(b"\n", 1)[0]
    rec = _legacy_decode(first)
    if rec is None or rec.get("magic") != _LEGACY_MAGIC:
        raise IndexFormatError(
            f"index file {path} is neither a gds_kvcache binary index nor its JSON-lines version "
            f"{_LEGACY_VERSION} (found {bytes(buf[:24])!r}); it is left untouched; move it away to start "
            "an empty index")
    if rec.get("version") != _LEGACY_VERSION:
        raise IndexFormatError(
            f"index file {path} is JSON-lines format version {rec.get('version')!r}; this library reads "
            f"binary version {INDEX_VERSION} and migrates JSON-lines version {_LEGACY_VERSION}; the files "
            "are left untouched")


def _legacy_decode(line: bytes) -> Optional[dict]:
    import json
    import zlib
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, chunks: Iterable) -> int:
    """Write ``chunks`` to ``path`` (truncating it) and fsync; return the size."""
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


# -- the index --------------------------------------------------------------------------
class IndexLog:
    """The on-disk index of one cache directory: snapshot + log of 64-byte records.

    Parameters
    ----------
    directory
        The cache directory; the files are ``kvcache.index*`` in it.

    Notes
    -----
    Call :meth:`load` once first (or :meth:`snapshot`); :meth:`append` and
    :meth:`next_seq` load lazily otherwise, which costs a full read.

    Crash safety: :meth:`append` writes a whole batch with one ``os.write``
    on an ``O_APPEND`` descriptor, so a crash loses at most (a suffix of) that
    batch; each slot's check rejects torn or altered slots, which
    :meth:`load` skips and counts. :meth:`snapshot` writes the new snapshot
    to a temporary file, fsyncs it, renames it into place and fsyncs the
    directory, and only then starts a new log carrying the new generation;
    the old log, still on disk if a crash comes first, no longer matches and
    is ignored, so a crash leaves the old state or the new one, never a mix.

    Appends are not fsynced: after a power cut the last batches may be lost
    (the chunks then read as absent), never half-applied. A flipped bit in a
    delete record loses that delete; a flipped bit in a table entry loses
    every record that uses it; both are counted as unusable.

    Size: 64 bytes per chunk (128 with a chunk_hash over 32 hex digits) plus
    a header slot per file and the tables; there is no cap. Loading 10M
    entries is dominated by building the Python objects (see
    ``scripts/bench_index.py``); the cyclic garbage collector is paused
    while they are built, as it would otherwise rescan them repeatedly.

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
        self._must_reset = False      # files on disk disagree with what load returned (corrupt header)
        self._gen = 0                 # generation the current log must carry (0: no binary snapshot)
        self._log_usable = False      # the log on disk matches self._gen and may be appended to
        self._seq = 0
        self._prefix_ids: dict[tuple, int] = {}   # ids in the current log
        self._layout_ids: dict[tuple, int] = {}
        self._next_prefix = 0
        self._next_layout = 0
        self._known_prefixes: dict[tuple, int] = {}   # every prefix/layout seen -> its table bytes
        self._known_layouts: dict[tuple, int] = {}
        self._valid_layouts: dict[tuple, _Layout] = {}
        self._valid_prefixes: set = set()
        self._snap_records = self._log_records = 0
        self._snap_bytes = self._log_bytes = self._legacy_bytes = 0

    # -- sizes ----------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes the index files take now (snapshot + log, and a not yet migrated JSON index)."""
        return self._snap_bytes + self._log_bytes + self._legacy_bytes

    @property
    def records(self) -> int:
        """Put and delete records in the snapshot and the log (live and dead)."""
        return self._snap_records + self._log_records

    @property
    def table_bytes(self) -> int:
        """Bytes the tables of every prefix and layout seen so far take in one file."""
        return sum(self._known_prefixes.values()) + sum(self._known_layouts.values())

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
            Bytes of the interning tables; :attr:`table_bytes` of the log in use
            bounds what a snapshot of its entries needs.

        Notes
        -----
        Exact for records: 64 bytes per entry, 128 per wide one, plus one
        header slot.
        """
        return SLOT * (1 + entries_count + wide) + table_bytes

    # -- reading ----------------------------------------------------------------------
    def load(self) -> tuple[list[DiskEntry], int]:
        """Live entries sorted by ``seq``, and the number of unusable records skipped.

        Raises
        ------
        IndexFormatError
            An index file has a foreign magic or a newer/unknown version; no
            file is changed.

        Notes
        -----
        Reads every file in full; never writes. Later records win: a put after
        a delete of the same key is live, a delete after a put removes it.
        """
        if self._closed:
            raise ClosedError("index log is closed")
        snap = _read(self.snap_path)
        logb = _read(self.log_path)
        legacy = _read(self.legacy_path) if snap is None else None
        # Every file is checked before any is used, so a refusal changes nothing.
        snap_h = _parse_header(self.snap_path, snap, _KIND_SNAP) if snap else None
        log_h = _parse_header(self.log_path, logb, _KIND_LOG) if logb else None
        if legacy is not None:
            _check_legacy_header(self.legacy_path, legacy)

        self._reset_state()
        self._snap_bytes = len(snap) if snap is not None else 0
        self._log_bytes = len(logb) if logb is not None else 0
        if snap is not None:
            self._legacy_bytes = os.path.getsize(self.legacy_path) if os.path.exists(self.legacy_path) else 0
        else:
            self._legacy_bytes = len(legacy or b"")
        if snap is not None and (snap_h is None or not snap_h.ok) or logb and not log_h.ok:
            # Without a trusted generation the log cannot be paired with the
            # snapshot, and either alone may resurrect deleted keys.
            lost = (len(snap or b"") + len(logb or b"")) // SLOT
            log.warning("index %s: a snapshot or log header is corrupt; starting with an empty index "
                        "(%d slot(s) dropped)", self.directory, lost)
            self._gen = snap_h.gen if snap_h is not None and snap_h.ok else 0
            self._must_reset = True    # the first write starts from an empty snapshot
            self._loaded = True
            return [], max(lost, 1)

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
        if logb is not None:
            if log_h is not None and log_h.gen == self._gen:
                ops, b, local = self._parse_slots(logb, tables)
                parts.append(ops)
                bad += b
                self._log_records = len(ops) + b
                self._log_usable = True
                self._prefix_ids, self._layout_ids, self._next_prefix, self._next_layout = local
            else:
                log.info("index %s: log of generation %s is older than the snapshot (%s); ignored",
                         self.directory, log_h.gen if log_h else None, self._gen)
        self._loaded = True
        self._remember_tables(tables)
        ops = _Ops.concat(parts)
        if len(ops):
            self._seq = max(self._seq, int(ops.seq.max()))
        live = self._live(ops)
        return self._build(live, tables), bad

    def _reset_state(self) -> None:
        self.close_fd()
        self._gen = 0
        self._must_reset = False
        self._log_usable = False
        self._prefix_ids, self._layout_ids = {}, {}
        self._next_prefix = self._next_layout = 0
        self._snap_records = self._log_records = 0

    def _remember_tables(self, tables: _Tables) -> None:
        for fields, g in tables.prefix_ids.items():
            if g >= 0:
                self._known_prefixes[fields] = SLOT * _def_span(_prefix_payload(fields))
                self._valid_prefixes.add(fields)
        for lay, g in tables.layout_ids.items():
            if g >= 0:
                self._known_layouts[lay] = SLOT * _def_span(_layout_payload(lay))
                self._valid_layouts[lay] = tables.layouts[g]

    def _parse_slots(self, buf: bytes, tables: _Tables):
        """Decode one binary file (header already checked) into operations.

        Returns the operations, the count of unusable slots/records, and the
        file's own tables as (prefix ids, layout ids, next prefix id, next layout id).
        """
        whole = (len(buf) - SLOT) // SLOT
        bad = 1 if (len(buf) - SLOT) % SLOT else 0      # torn tail
        body = buf[SLOT:SLOT + whole * SLOT]
        rows = np.frombuffer(body, _SLOT_DTYPE)
        words = np.frombuffer(body, "<u8").reshape(-1, 8)
        ok = _slot_checks(words) == words[:, 7]
        bad += int(whole - np.count_nonzero(ok))
        tag = rows["tag"]
        span = rows["span"]

        # Tables first (few records, parsed one by one).
        local_prefix: dict[int, int] = {}   # file id -> global id (-1: unusable)
        local_layout: dict[int, int] = {}
        prefix_ids: dict[tuple, int] = {}
        layout_ids: dict[tuple, int] = {}
        max_prefix = max_layout = -1
        for i in np.flatnonzero(ok & ((tag == _DEF_PREFIX) | (tag == _DEF_LAYOUT))).tolist():
            n = int(span[i])
            ident = int(rows["prefix"][i])
            if tag[i] == _DEF_PREFIX:
                max_prefix = max(max_prefix, ident)
            else:
                max_layout = max(max_layout, ident)
            payload = self._gather(body, ok, tag, span, i, n)
            try:
                if payload is None:
                    raise ValueError("record incomplete")
                if tag[i] == _DEF_PREFIX:
                    fields = _parse_prefix(payload)
                    g = tables.prefix(fields)
                    target, mine = local_prefix, prefix_ids
                else:
                    fields = _parse_layout(payload)
                    g = tables.layout(fields)
                    target, mine = local_layout, layout_ids
            except (ValueError, struct.error, UnicodeDecodeError) as e:
                log.warning("index table record at slot %d unusable (%s)", i + 1, e)
                continue
            if ident in target and target[ident] != g:
                g = -1    # one id, two meanings: trust neither
            target[ident] = g
            mine[fields] = ident

        is_rec = ok & ((tag == _PUT) | (tag == _DEL) | (tag == _PUT_WIDE) | (tag == _DEL_WIDE))
        narrow = is_rec & (span == 1) & ((tag == _PUT) | (tag == _DEL))
        wide_head = is_rec & ((tag == _PUT_WIDE) | (tag == _DEL_WIDE)) & (span == 2)
        if wide_head.any():
            nxt = np.zeros_like(ok)
            nxt[:-1] = ok[1:] & (tag[1:] == _CONT) & (span[1:] == 1)
            wide_head &= nxt
        usable = narrow | wide_head
        # Intact slots that are neither tables, continuations nor usable records: count them.
        known = usable | (tag == _DEF_PREFIX) | (tag == _DEF_LAYOUT) | (tag == _CONT)
        bad += int(np.count_nonzero(ok & ~known)) + int(np.count_nonzero(is_rec & ~usable))
        if rows.shape[0]:
            max_prefix = max(max_prefix, int(rows["prefix"][is_rec].max(initial=0)))
            max_layout = max(max_layout, int(rows["layout"][is_rec].max(initial=0)))

        idx = np.flatnonzero(usable)
        if idx.shape[0] and idx[-1] - idx[0] + 1 == idx.shape[0]:
            r = rows[idx[0]:idx[-1] + 1]    # the usual file: tables, then records only; no copy
        else:
            r = rows[idx]
        is_wide = wide_head[idx]
        ops = _Ops(0, wide=bool(is_wide.any()))
        if ops.hi is not None:
            ops.hi = np.zeros((idx.shape[0], 16), np.uint8)
        t = r["tag"]
        ops.is_put = (t == _PUT) | (t == _PUT_WIDE)
        pmap = np.full(max(local_prefix, default=-1) + 2, -1, np.int64)
        for k, g in local_prefix.items():
            pmap[k] = g
        lmap = np.full(max(local_layout, default=-1) + 2, -1, np.int64)
        for k, g in local_layout.items():
            lmap[k] = g
        pid = r["prefix"].astype(np.int64)
        lid = r["layout"].astype(np.int64)
        ops.prefix = pmap[np.minimum(pid, pmap.shape[0] - 1)]
        ops.layout = np.where(ops.is_put, lmap[np.minimum(lid, lmap.shape[0] - 1)], -1)
        ops.ndig = r["ndig"]
        ops.lo = r["hash"]
        if ops.hi is not None:
            ops.hi[is_wide] = rows["hash"][idx[is_wide] + 1]
        ops.phys = r["phys"].astype(np.uint64) * np.uint64(PAGE)
        ops.offset = r["offset"]
        ops.seq = r["seq"]
        ops.csum = r["csum"]
        good = self._valid_ops(ops, is_wide, tables)
        bad += int(idx.shape[0] - np.count_nonzero(good))
        local = (prefix_ids, layout_ids, max_prefix + 1, max_layout + 1)
        return (ops if good.all() else ops.take(np.flatnonzero(good))), bad, local

    @staticmethod
    def _gather(body: bytes, ok, tag, span, i: int, n: int) -> Optional[bytes]:
        """The payload of the table record whose head is slot ``i`` and spans ``n`` slots."""
        if n < 1 or i + n > tag.shape[0]:
            return None
        parts = [body[i * SLOT + _DEF_HEAD.size:i * SLOT + _BODY]]
        for j in range(1, n):
            s = i + j
            if not ok[s] or tag[s] != _CONT or span[s] != j:
                return None
            parts.append(body[s * SLOT + _CONT_HEAD.size:s * SLOT + _BODY])
        payload = b"".join(parts)
        (length,) = struct.unpack_from("<I", payload)
        if length > len(payload) - 4:
            return None
        return payload[4:4 + length]

    @staticmethod
    def _valid_ops(ops: _Ops, is_wide: np.ndarray, tables: _Tables) -> np.ndarray:
        """Which decoded operations describe a possible key (and, for puts, a possible extent)."""
        n = len(ops)
        good = ops.prefix >= 0
        nd = ops.ndig.astype(np.int64)
        good &= np.where(is_wide, (nd > _NARROW) & (nd <= 2 * _NARROW), (nd >= 1) & (nd <= _NARROW))
        if n:
            strlen = np.array([p.strlen for p in tables.prefixes] + [0], np.int64)
            good &= strlen[ops.prefix] + nd <= MAX_KEY_STRING
            # A hash may not have more significant digits than its recorded length.
            short = np.flatnonzero(good & ~is_wide & (nd < _NARROW))
            if short.size:
                good[short] &= _leading_zero_nibbles(ops.lo[short]) >= _NARROW - nd[short]
            w = np.flatnonzero(good & is_wide)
            if w.size:
                both = np.concatenate([ops.hi[w], ops.lo[w]], axis=1)
                good[w] &= _leading_zero_nibbles(both) >= 2 * _NARROW - nd[w]
            put = ops.is_put
            # phys is below 2**44 (32-bit page count), so comparing in float64
            # is exact wherever it matters; larger layouts fail either way.
            nbytes = np.array([float(min(v.nbytes, 1 << 63)) for v in tables.layouts] + [0.0], np.float64)
            lay_ok = ops.layout >= 0
            need = nbytes[np.where(lay_ok, ops.layout, -1)]
            ext_ok = (lay_ok & (ops.phys > 0) & (ops.phys.astype(np.float64) >= need)
                      & (ops.offset % np.uint64(PAGE) == 0))
            good &= ~put | ext_ok
        return good

    def _parse_legacy(self, buf: bytes, tables: _Tables) -> tuple[_Ops, int]:
        """Operations of a JSON-lines index of version 1 (one-time migration; a Python loop)."""
        lines = buf.split(b"\n")
        bad = 0
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            bad += 1   # torn last line
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
                    shape = tuple(int(d) for d in rec["shape"])
                    lay = tables.layout((shape, str(rec["dtype"]), str(rec["fmt"])))
                    vals = (lay, int(rec["phys"]), int(rec["off"]), seq, int(rec["csum"], 16), int(rec["n"]))
                    if lay < 0 or vals[5] != tables.layouts[lay].nbytes:
                        raise ValueError("nbytes does not match shape and dtype")
                    if not (0 < vals[1] <= _MAX_U32 * PAGE and vals[1] % PAGE == 0 and vals[1] >= vals[5]
                            and 0 <= vals[2] <= _MAX_U64 and vals[2] % PAGE == 0 and 0 <= vals[3] <= _MAX_U64
                            and 0 <= vals[4] <= _MAX_U64):
                        raise ValueError("impossible extent, seq or checksum")
                elif op == "del":
                    vals = (-1, 0, 0, seq, 0, 0)
                else:
                    raise ValueError(f"unknown op {op!r}")
                g = tables.prefix((key.fmt, key.model_name, key.world_size, key.worker_id))
                if g < 0:
                    raise ValueError("key prefix unusable")
                recs.append((op == "put", g, key.chunk_hash) + vals)
            except (ValueError, KeyError, TypeError, AttributeError, GdsKvCacheError) as e:
                log.warning("JSON index %s line %d unusable (%s); skipped", self.legacy_path, i + 1, e)
                bad += 1
        wide = any(len(r[2]) > _NARROW for r in recs)
        ops = _Ops(len(recs), wide=wide)
        for i, (is_put, g, h, lay, phys, off, seq, csum, _) in enumerate(recs):
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
        fp = _fingerprints(ident)
        order = np.argsort(fp)
        sfp = fp[order]
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(sfp[1:], sfp[:-1], out=first[1:])
        if first.all():
            win = None     # every key once: the common case, nothing to merge
        else:
            # Equal fingerprints almost always mean equal keys; check, and
            # settle any true collision exactly.
            pairs = np.flatnonzero(~first[1:])
            a, b = order[pairs], order[pairs + 1]
            differ = np.zeros(pairs.shape[0], bool)
            for c in ident:
                differ |= c[a] != c[b]
            starts = np.flatnonzero(first)
            # The last operation of a key is the one latest in the files.
            win = np.maximum.reduceat(order, starts)
            if differ.any():
                win = IndexLog._settle_collisions(order, sfp, starts, win, ident, np.unique(sfp[pairs[differ]]))
            win.sort()
        if win is None:
            if ops.is_put.all():
                live = ops
            else:
                live = ops.take(np.flatnonzero(ops.is_put))
        else:
            live = ops.take(win[ops.is_put[win]])
        seq = live.seq
        if seq.shape[0] > 1 and not (seq[1:] >= seq[:-1]).all():
            live = live.take(np.argsort(seq, kind="stable"))
        return live

    @staticmethod
    def _settle_collisions(order, sfp, starts, win, ident, fps) -> np.ndarray:
        """Winners where distinct keys share a fingerprint (about 2**-64 per pair)."""
        keep = np.ones(win.shape[0], bool)
        extra = []
        for f in fps.tolist():
            g = int(np.searchsorted(sfp[starts], f))
            keep[g] = False
            final: dict = {}
            for i in sorted(order[sfp == f].tolist()):
                final[tuple(int(c[i]) for c in ident)] = i
            extra += final.values()
        return np.concatenate([win[keep], np.array(extra, win.dtype)])

    @staticmethod
    def _build(ops: _Ops, tables: _Tables) -> list[DiskEntry]:
        """The ``DiskEntry`` objects of ``ops`` (all puts, all valid), built in bulk.

        Notes
        -----
        Keys are made without ``CacheEngineKey.__init__``: their prefix was
        validated once per table entry and their hash is hex by construction,
        so the per-key checks (about 5 us a key, more than the rest of the
        load) would only repeat themselves.
        """
        n = len(ops)
        out: list[DiskEntry] = []
        if n == 0:
            return out
        new = object.__new__
        # Writing the instance dict of a new key is the cheapest way to make one
        # (frozen dataclasses only guard setattr); the result equals, hashes
        # and compares as CacheEngineKey(fmt, model, ws, wid, hash) would.
        templates = [dict(zip(("fmt", "model_name", "world_size", "worker_id"), p.fields)) for p in tables.prefixes]
        prefixes = np.empty(len(templates) + 1, object)
        for i, t in enumerate(templates):
            prefixes[i] = t
        layouts = np.empty(len(tables.layouts) + 1, object)
        for i, v in enumerate(tables.layouts):
            layouts[i] = v
        was_enabled = gc.isenabled()
        gc.disable()   # millions of new objects would set off repeated full collections
        try:
            for s in range(0, n, _BUILD_BLOCK):
                sl = slice(s, s + _BUILD_BLOCK)
                pid = ops.prefix[sl]
                lid = ops.layout[sl]
                m = pid.shape[0]
                ndig = ops.ndig[sl]
                if ops.hi is None:
                    hashes = _hex_strings(ops.lo[sl], ndig)
                else:
                    hashes = _hex_strings(np.concatenate([ops.hi[sl], ops.lo[sl]], axis=1), ndig)
                keys = list(map(new, repeat(CacheEngineKey, m)))
                if (pid == pid[0]).all():
                    t = templates[int(pid[0])]
                    for k, h in zip(keys, hashes):
                        d = k.__dict__
                        d.update(t)
                        d["chunk_hash"] = h
                else:
                    for k, t, h in zip(keys, prefixes[pid].tolist(), hashes):
                        d = k.__dict__
                        d.update(t)
                        d["chunk_hash"] = h
                if (lid == lid[0]).all():
                    lay = tables.layouts[int(lid[0])]
                    nb, sh, dt, fm = repeat(lay.nbytes, m), repeat(lay.shape, m), repeat(lay.dtype, m), repeat(lay.fmt, m)
                else:
                    ls = layouts[lid].tolist()
                    nb = [v.nbytes for v in ls]
                    sh = [v.shape for v in ls]
                    dt = [v.dtype for v in ls]
                    fm = [v.fmt for v in ls]
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

    # -- writing ----------------------------------------------------------------------------
    def next_seq(self) -> int:
        """Reserve and return the next sequence number (above every one on disk)."""
        self._ensure_loaded()
        self._seq += 1
        return self._seq

    def append(self, puts: Sequence[DiskEntry] = (), dels: Sequence[CacheEngineKey] = ()) -> None:
        """Record ``puts`` then ``dels`` with one ``os.write``; each gets a fresh ``seq``.

        Raises
        ------
        IndexEntryError
            An entry has an impossible extent, shape, dtype or fmt (nothing is written).
        OSError
            The write failed; the log is cut back to its previous size and nothing
            is recorded.

        Notes
        -----
        Sets ``e.seq`` of every put. Not fsynced (see the class notes).
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
        saved = (dict(self._prefix_ids), dict(self._layout_ids), self._next_prefix, self._next_layout, self._seq)
        buf = bytearray()
        seqs = []
        nrec = 0
        for e, lay in zip(puts, lays):
            pid = self._prefix_id(e.key, buf)
            lid = self._layout_id(lay, buf)
            self._seq += 1
            seqs.append(self._seq)
            nrec += 1
            self._put_slots(buf, e, pid, lid, self._seq)
        for k in dels:
            pid = self._prefix_id(k, buf)
            self._seq += 1
            nrec += 1
            self._del_slots(buf, k, pid, self._seq)
        _seal(buf)
        before = self._log_bytes
        try:
            mv = memoryview(buf)
            w = os.write(self._fd, mv)
            while w < len(mv):       # a short write of a regular file: keep slots whole
                mv = mv[w:]
                w = os.write(self._fd, mv)
        except BaseException:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                self.close_fd()       # re-checked (and cut to whole slots) at the next append
            (self._prefix_ids, self._layout_ids, self._next_prefix, self._next_layout, _) = saved
            raise
        for e, s in zip(puts, seqs):
            e.seq = s
        self._log_bytes += len(buf)
        self._log_records += nrec

    def _check_entry(self, e: DiskEntry) -> tuple:
        """Validate one entry for writing; return its layout tuple."""
        lay = (e.shape, e.dtype, e.fmt)
        v = self._valid_layouts.get(lay)
        if v is None:
            try:
                shape = tuple(e.shape)
                v = _Layout((shape, e.dtype, e.fmt))
            except (GdsKvCacheError, ValueError, TypeError) as exc:
                raise IndexEntryError(f"entry {e.key!r}: {exc}") from None
            lay = (shape, e.dtype, e.fmt)
            self._valid_layouts[lay] = v
        k = e.key
        if not isinstance(k, CacheEngineKey):
            raise IndexEntryError(f"entry key must be a CacheEngineKey, got {type(k).__name__}")
        if e.nbytes != v.nbytes:
            raise IndexEntryError(f"entry {k.to_string()}: nbytes {e.nbytes} != {v.nbytes} "
                                  f"(shape {v.shape} of {v.dtype})")
        if not (isinstance(e.phys_size, int) and e.phys_size >= e.nbytes and e.phys_size % PAGE == 0
                and e.phys_size // PAGE <= _MAX_U32):
            raise IndexEntryError(f"entry {k.to_string()}: phys_size {e.phys_size!r} must be a multiple of "
                                  f"{PAGE} of at least nbytes {e.nbytes} and below 16 TiB")
        if not (isinstance(e.offset, int) and 0 <= e.offset <= _MAX_U64 and e.offset % PAGE == 0):
            raise IndexEntryError(f"entry {k.to_string()}: offset {e.offset!r} must be a non-negative "
                                  f"multiple of {PAGE}")
        if not (isinstance(e.checksum, int) and 0 <= e.checksum <= _MAX_U64):
            raise IndexEntryError(f"entry {k.to_string()}: checksum {e.checksum!r} is not 64-bit unsigned")
        return (v.shape, v.dtype, v.fmt)

    def _open_log(self) -> None:
        """Make sure the log on disk is current and open for appends."""
        if self._fd is not None:
            return
        if self._log_usable:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            size = os.fstat(fd).st_size
            whole = SLOT + (size - SLOT) // SLOT * SLOT
            if size < SLOT:
                os.close(fd)
                self._log_usable = False
            else:
                if whole != size:
                    os.ftruncate(fd, whole)   # a torn tail would misalign every later slot
                self._fd = fd
                self._log_bytes = whole
                return
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
        self._log_bytes = n
        self._log_records = 0
        self._prefix_ids, self._layout_ids = {}, {}
        self._next_prefix = self._next_layout = 0

    def _prefix_id(self, k: CacheEngineKey, buf: bytearray) -> int:
        fields = (k.fmt, k.model_name, k.world_size, k.worker_id)
        i = self._prefix_ids.get(fields)
        if i is None:
            i = self._next_prefix
            self._next_prefix += 1
            self._prefix_ids[fields] = i
            payload = _prefix_payload(fields)
            buf += _def_slots(_DEF_PREFIX, i, payload)
            self._known_prefixes[fields] = SLOT * _def_span(payload)
        return i

    def _layout_id(self, lay: tuple, buf: bytearray) -> int:
        i = self._layout_ids.get(lay)
        if i is None:
            i = self._next_layout
            self._next_layout += 1
            self._layout_ids[lay] = i
            payload = _layout_payload(lay)
            buf += _def_slots(_DEF_LAYOUT, i, payload)
            self._known_layouts[lay] = SLOT * _def_span(payload)
        return i

    @staticmethod
    def _put_slots(buf: bytearray, e: DiskEntry, pid: int, lid: int, seq: int) -> None:
        h = e.key.chunk_hash
        raw = int(h, 16).to_bytes(32, "big")
        wide = len(h) > _NARROW
        buf += _REC.pack(_PUT_WIDE if wide else _PUT, len(h), 2 if wide else 1, pid, lid, e.phys_size // PAGE,
                         e.offset, seq, e.checksum, raw[16:]) + bytes(8)
        if wide:
            buf += _REC.pack(_CONT, 0, 1, 0, 0, 0, 0, 0, 0, raw[:16]) + bytes(8)

    @staticmethod
    def _del_slots(buf: bytearray, k: CacheEngineKey, pid: int, seq: int) -> None:
        h = k.chunk_hash
        raw = int(h, 16).to_bytes(32, "big")
        wide = len(h) > _NARROW
        buf += _REC.pack(_DEL_WIDE if wide else _DEL, len(h), 2 if wide else 1, pid, 0, 0, 0, seq, 0,
                         raw[16:]) + bytes(8)
        if wide:
            buf += _REC.pack(_CONT, 0, 1, 0, 0, 0, 0, 0, 0, raw[:16]) + bytes(8)

    def snapshot(self, entries: Iterable[DiskEntry]) -> None:
        """Make the index equal to exactly ``entries``, atomically and crash-safely.

        Raises
        ------
        IndexEntryError
            An entry cannot be recorded (nothing on disk changes).
        IndexFormatError
            Called before :meth:`load` on a directory whose index is foreign
            or newer (nothing on disk changes).

        Notes
        -----
        Order: new snapshot to ``.tmp``, fsync, rename, fsync directory; then
        a fresh log of the new generation (also temp + rename); then the
        JSON index of earlier versions, if any, is deleted. Entries are
        written in ``seq`` order and keep their ``seq``. Costs about as much
        as :meth:`load` (the entries' fields are read in Python).
        """
        if self._closed:
            raise ClosedError("index log is closed")
        if not self._loaded:
            self._check_headers()
        entries = entries if isinstance(entries, list) else list(entries)
        blocks, n, wide = self._encode_snapshot(entries)
        gen = 0
        while gen == 0:
            gen = int.from_bytes(os.urandom(8), "little")
        tmp = self.snap_path + ".tmp"
        size = _write_file(tmp, [_header_slot(_KIND_SNAP, gen)] + blocks)
        os.replace(tmp, self.snap_path)
        _fsync_dir(self.directory)
        # The new snapshot is durable: the old log no longer matches it and is ignored from here.
        self._gen = gen
        self._snap_bytes = size
        self._snap_records = n
        self._new_log()
        if os.path.exists(self.legacy_path):
            os.unlink(self.legacy_path)
            _fsync_dir(self.directory)
        self._legacy_bytes = 0
        self._must_reset = False
        if entries:
            self._seq = max(self._seq, max(e.seq for e in entries))
        self._loaded = True

    def _check_headers(self) -> None:
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

    def _encode_snapshot(self, entries: list[DiskEntry]) -> tuple[list, int, int]:
        """The snapshot body (tables + records) as a list of buffers; validates every entry first."""
        n = len(entries)
        prefix_ids: dict[tuple, int] = {}
        layout_ids: dict[tuple, int] = {}
        pid = np.empty(n, np.uint32)
        lid = np.empty(n, np.uint32)
        lay_of = self._valid_layouts
        check = self._check_entry
        for i, e in enumerate(entries):
            k = e.key
            fields = (k.fmt, k.model_name, k.world_size, k.worker_id)
            p = prefix_ids.get(fields)
            if p is None:
                if not isinstance(k, CacheEngineKey):
                    raise IndexEntryError(f"entry key must be a CacheEngineKey, got {type(k).__name__}")
                p = prefix_ids[fields] = len(prefix_ids)
            pid[i] = p
            lay = (e.shape, e.dtype, e.fmt)
            q = layout_ids.get(lay)
            if q is None:
                lay = check(e)   # validates the layout once; the extent of every entry is checked below
                q = layout_ids.get(lay)
                if q is None:
                    q = len(layout_ids)
                layout_ids[(e.shape, e.dtype, e.fmt)] = layout_ids[lay] = q
            lid[i] = q
        # Per-entry numbers, checked in bulk (one Python pass per field).
        def col(get, what):
            try:
                return np.array([get(e) for e in entries], np.uint64) if n else np.zeros(0, np.uint64)
            except (OverflowError, TypeError, ValueError):
                raise IndexEntryError(f"an entry's {what} is not a 64-bit unsigned int") from None
        offset = col(lambda e: e.offset, "offset")
        phys = col(lambda e: e.phys_size, "phys_size")
        nbytes = col(lambda e: e.nbytes, "nbytes")
        csum = col(lambda e: e.checksum, "checksum")
        seq = col(lambda e: e.seq, "seq")
        lay_list = [None] * len(set(layout_ids.values()))
        for lay, q in layout_ids.items():
            if lay in lay_of:
                lay_list[q] = lay_of[lay]
        lay_nbytes = np.array([v.nbytes if v.nbytes <= _MAX_U64 else 0 for v in lay_list], np.uint64)
        bad = ((nbytes != lay_nbytes[lid]) | (phys < nbytes) | (phys % np.uint64(PAGE) != 0)
               | (phys // np.uint64(PAGE) > np.uint64(_MAX_U32)) | (offset % np.uint64(PAGE) != 0))
        if bad.any():
            check(entries[int(np.flatnonzero(bad)[0])])   # raises with the details
            raise IndexEntryError("entry with an impossible extent")   # pragma: no cover - check() raised
        hashes = [e.key.chunk_hash for e in entries]
        ndig = np.fromiter(map(len, hashes), np.uint8, count=n)
        is_wide = ndig > _NARROW
        if not is_wide.any() and (ndig == _NARROW).all():
            lo = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(n, 16)
            hi = None
        else:
            raw = b"".join(int(h, 16).to_bytes(32, "big") for h in hashes)
            both = np.frombuffer(raw, np.uint8).reshape(n, 32)
            lo, hi = both[:, 16:], both[:, :16]
        order = np.argsort(seq, kind="stable")

        blocks: list = []
        tables = bytearray()
        for fields, p in prefix_ids.items():
            payload = _prefix_payload(fields)
            tables += _def_slots(_DEF_PREFIX, p, payload)
            self._known_prefixes[fields] = SLOT * _def_span(payload)
        seen = set()
        for lay, q in layout_ids.items():
            if q in seen:
                continue
            seen.add(q)
            v = lay_list[q]
            payload = _layout_payload((v.shape, v.dtype, v.fmt))
            tables += _def_slots(_DEF_LAYOUT, q, payload)
            self._known_layouts[(v.shape, v.dtype, v.fmt)] = SLOT * _def_span(payload)
        if tables:
            _seal(tables)
            blocks.append(tables)
        nwide = int(np.count_nonzero(is_wide))
        for s in range(0, n, _BUILD_BLOCK * 4):
            o = order[s:s + _BUILD_BLOCK * 4]
            w = is_wide[o]
            m = o.shape[0] + int(np.count_nonzero(w))
            rows = np.zeros(m, _SLOT_DTYPE)
            # Row position of each entry: one slot each, two for wide hashes.
            pos = np.arange(o.shape[0]) + np.concatenate([[0], np.cumsum(w)[:-1]]).astype(np.int64)
            r = rows[pos]
            r["tag"] = np.where(w, _PUT_WIDE, _PUT)
            r["ndig"] = ndig[o]
            r["span"] = np.where(w, 2, 1)
            r["prefix"] = pid[o]
            r["layout"] = lid[o]
            r["phys"] = phys[o] // np.uint64(PAGE)
            r["offset"] = offset[o]
            r["seq"] = seq[o]
            r["csum"] = csum[o]
            r["hash"] = lo[o]
            rows[pos] = r
            if w.any():
                cont = pos[w] + 1
                rows["tag"][cont] = _CONT
                rows["span"][cont] = 1
                rows["hash"][cont] = hi[o[w]]
            _seal(rows)
            blocks.append(rows.view(np.uint8))
        return blocks, n, nwide

    # -- closing -----------------------------------------------------------------------------
    def close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the log; later calls raise ``ClosedError``."""
        self.close_fd()
        self._closed = True
