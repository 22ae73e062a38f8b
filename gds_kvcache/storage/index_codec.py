"""The disk index's on-disk format: fixed 56-byte binary records, a snapshot plus a log.

This module is the format's one description (the other index modules point
here) and its building blocks: the layout constants, the slot checks, the
file header, the interning tables' entries and their validation (``Layout``,
``Tables``). Records are encoded in ``index_encode`` and decoded in bulk in
``index_decode``; the JSON-lines format of version 1 is read in
``index_legacy``; the files' lifecycle (snapshot, log, generations, fsyncs)
is ``index_log``; the chunk descriptor the records hold is
``entry.DiskEntry``.

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

Invariants kept here: the bytes are fixed by the layout constants below
(``SLOT``, the tags, the structs, ``OFF_BITS``; changing any is a new
``INDEX_VERSION``); every slot is 56 bytes and its check covers all its
bytes but the check itself; a table entry's slots are contiguous and each
payload reads back as written (``parse_prefix``/``parse_layout``).
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import GdsKvCacheError, IndexFormatError
from ..key import CacheEngineKey
from ..memory.format import MemoryFormat, str_to_dtype
from ..units import PAGE

__all__ = ["INDEX_VERSION", "INDEX_MAGIC", "SLOT", "TABLE_ALLOWANCE", "SNAP_NAME", "LOG_NAME", "LEGACY_NAME",
           "LEGACY_VERSION", "MAX_OFFSET", "MAX_PHYS_SIZE"]

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
#: Format version of the JSON-lines index (``LEGACY_NAME``; read by ``index_legacy``).
LEGACY_VERSION = 1

# File kinds (the header's kind field).
KIND_SNAP = 1
KIND_LOG = 2

# Record tags (first byte of a slot).
PUT = ord("P")         # put, hash of 1-32 hex digits: 1 slot
DEL = ord("D")         # delete, hash of 1-32 digits: 1 slot
PUT_WIDE = ord("W")    # put, hash of 33-64 digits: head slot + 1 continuation holding the high 128 bits
DEL_WIDE = ord("E")    # delete, hash of 33-64 digits: same
DEF_PREFIX = ord("K")  # table entry: (fmt, model_name, world_size, worker_id)
DEF_LAYOUT = ord("L")  # table entry: (shape, dtype, fmt)
CONT = ord("C")        # continuation slot; its span field is its index in the record

SLOT_DTYPE = np.dtype([("tag", "u1"), ("ndig", "u1"), ("span", "<u2"), ("check", "<u4"), ("prefix", "<u4"),
                       ("layout", "<u4"), ("ext", "<u8"), ("seq", "<u8"), ("csum", "<u8"), ("hash", "u1", (16,))])
assert SLOT_DTYPE.itemsize == SLOT
REC = struct.Struct("<BBHIIIQQQ16s")             # a record slot, check left 0
_HEAD = struct.Struct("<8sIIQI20xQ")             # magic, version, kind, generation, slot size, check
DEF_HEAD = struct.Struct("<BBHII")               # tag, 0, span, check, table id; then payload
CONT_HEAD = struct.Struct("<BBHI")               # tag C, 0, index, check; then payload
_DEF_FIRST = SLOT - DEF_HEAD.size                # 44 payload bytes in a table entry's first slot
_CONT_BODY = SLOT - CONT_HEAD.size               # 48 in each continuation
assert _HEAD.size == SLOT

OFF_BITS = 40
_PHYS_BITS = 64 - OFF_BITS
#: Largest pool offset and chunk extent a record can hold.
MAX_OFFSET = ((1 << OFF_BITS) - 1) * PAGE
MAX_PHYS_SIZE = ((1 << _PHYS_BITS) - 1) * PAGE
MAX_U64 = (1 << 64) - 1
NARROW = 32                                      # hex digits a one-slot record holds

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
BUILD_BLOCK = 1 << 16                            # entries built per round (bounds temporaries)

# -- checks -------------------------------------------------------------------------
def mix(cols: Sequence[np.ndarray]) -> np.ndarray:
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


def slot_words(buf) -> np.ndarray:
    """``buf`` (whole slots) as ``(n, 7)`` uint64 words, no copy."""
    raw = buf.view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    return raw.reshape(-1, SLOT).view("<u8")


def slot_checks(words: np.ndarray) -> np.ndarray:
    """The check of each slot of ``words`` (``(n, 7)`` uint64): its bytes other than 4-7, hashed."""
    out = np.empty(words.shape[0], np.uint32)
    for s in range(0, words.shape[0], _BLOCK):
        w = words[s:s + _BLOCK]
        cols = [w[:, 0] & _LOW32] + [w[:, i] for i in range(1, SLOT // 8)]
        out[s:s + w.shape[0]] = mix(cols) & _LOW32
    return out


_M64 = (1 << 64) - 1
_WORDS = struct.Struct("<7Q")
_FEW = 8                                         # slots sealed in Python (NumPy's call overhead is more)


def _slot_check(words: tuple) -> int:
    """:func:`slot_checks` of one slot's seven words, in Python: the same arithmetic mod 2**64."""
    h = int(_SEED)
    k1, k2 = int(_K1), int(_K2)
    for i, c in enumerate(words):
        t = ((c & 0xFFFFFFFF if i == 0 else c) * k1) & _M64
        t ^= t >> 31
        h = ((h ^ t) * k2) & _M64
    h ^= h >> 29
    h = (h * int(_K3)) & _M64
    h ^= h >> 32
    return h & 0xFFFFFFFF


def seal(buf) -> None:
    """Fill in the check of every slot of ``buf`` (a writable buffer of whole slots)."""
    mv = memoryview(buf).cast("B")
    if len(mv) <= _FEW * SLOT and isinstance(buf, (bytearray, memoryview)):
        # A log append of a record or two (an eviction's delete, a single put): Python is faster.
        for s in range(0, len(mv), SLOT):
            w = _WORDS.unpack_from(mv, s)
            struct.pack_into("<I", mv, s + 4, _slot_check(w))
        return
    w = slot_words(buf)
    w[:, 0] = (w[:, 0] & _LOW32) | (slot_checks(w).astype(np.uint64) << np.uint64(32))


def header_check(buf) -> int:
    """The check of a header slot (its first 48 bytes, hashed)."""
    w = np.frombuffer(buf[:SLOT - 8], "<u8")
    return int(mix([w[i:i + 1] for i in range(w.shape[0])])[0])


# -- file header -------------------------------------------------------------------------
@dataclass
class Header:
    gen: int
    ok: bool          # its check holds


def parse_header(path: str, buf: bytes, kind: int) -> Header:
    """Check magic and version (raising, the file untouched); read the generation."""
    magic = buf[:len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC[:len(magic)] or (len(buf) >= len(INDEX_MAGIC) and magic != INDEX_MAGIC):
        raise IndexFormatError(
            f"index file {path} does not start with the gds_kvcache index magic {INDEX_MAGIC!r} "
            f"(found {bytes(buf[:8])!r}): not written by this library; it is left untouched. "
            "Move it away to start with an empty index")
    if len(buf) < SLOT:
        return Header(0, False)
    _, version, k, gen, slot, check = _HEAD.unpack_from(buf)
    if version != INDEX_VERSION:
        raise IndexFormatError(
            f"index file {path} is format version {version}; this library reads version {INDEX_VERSION} "
            f"(and migrates version {LEGACY_VERSION}, the JSON-lines {LEGACY_NAME}). The files are left "
            "untouched: open the directory with the library version that wrote them, or move the "
            "kvcache.index* files away to start with an empty index")
    return Header(gen, slot == SLOT and k == kind and check == header_check(buf))


def header_slot(kind: int, gen: int) -> bytes:
    """The header slot of a file of ``kind`` and generation ``gen``."""
    head = _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, kind, gen, SLOT, 0)
    return _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, kind, gen, SLOT, header_check(head))


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


def prefix_payload(fields: tuple) -> bytes:
    """The table entry payload of a key prefix (fmt, model_name, world_size, worker_id)."""
    fmt, model, ws, wid = fields
    return _pack_strs(fmt.encode(), model.encode(), str(ws).encode(), str(wid).encode())


def layout_payload(lay: tuple) -> bytes:
    """The table entry payload of a layout (shape, dtype, fmt)."""
    shape, dtype, fmt = lay
    return _pack_strs(dtype.encode(), fmt.encode()) + struct.pack(f"<H{len(shape)}Q", len(shape), *shape)


def def_span(payload: bytes) -> int:
    """Slots the table entry of ``payload`` takes."""
    rest = max(0, 4 + len(payload) - _DEF_FIRST)
    return 1 + -(-rest // _CONT_BODY)


def def_slots(tag: int, ident: int, payload: bytes) -> bytes:
    """A table entry as whole slots (checks left 0 for :func:`seal`)."""
    span = def_span(payload)
    payload = struct.pack("<I", len(payload)) + payload
    payload = payload.ljust(_DEF_FIRST + (span - 1) * _CONT_BODY, b"\0")
    out = [DEF_HEAD.pack(tag, 0, span, 0, ident) + payload[:_DEF_FIRST]]
    for j in range(1, span):
        out.append(CONT_HEAD.pack(CONT, 0, j, 0) + payload[_DEF_FIRST + (j - 1) * _CONT_BODY:][:_CONT_BODY])
    return b"".join(out)


def parse_prefix(payload: bytes) -> tuple:
    """:func:`prefix_payload`'s inverse (ValueError, struct.error or UnicodeDecodeError if malformed)."""
    (fmt, model, ws, wid), _ = _unpack_strs(payload, 4)
    if not (ws.isdigit() and wid.isdigit()):
        raise ValueError("world_size/worker_id are not decimal")
    return (fmt.decode(), model.decode(), int(ws), int(wid))


def parse_layout(payload: bytes) -> tuple:
    """:func:`layout_payload`'s inverse (ValueError, struct.error or UnicodeDecodeError if malformed)."""
    (dtype, fmt), pos = _unpack_strs(payload, 2)
    (ndim,) = struct.unpack_from("<H", payload, pos)
    return (struct.unpack_from(f"<{ndim}Q", payload, pos + 2), dtype.decode(), fmt.decode())


class Layout:
    """A validated (shape, dtype, fmt) and the byte count it implies."""

    __slots__ = ("shape", "dtype", "fmt", "nbytes")

    def __init__(self, lay: tuple):
        shape, dtype, fmt = lay
        if not isinstance(fmt, str) or fmt not in MemoryFormat.__members__:
            raise ValueError(f"unknown memory format {fmt!r} (known: {', '.join(MemoryFormat.__members__)})")
        itemsize = str_to_dtype(dtype).itemsize
        shape = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_U64 for d in shape):
            raise ValueError(f"shape {shape!r} has a dimension that is not an int in [0, 2**64)")
        self.shape, self.dtype, self.fmt = shape, dtype, fmt
        self.nbytes = math.prod(shape) * itemsize
        if self.nbytes <= 0:
            raise ValueError(f"shape {shape!r} of {dtype} holds no bytes")


class _Prefix:
    """A validated key prefix and the length of its key string without the hash."""

    __slots__ = ("fields", "strlen")

    def __init__(self, fields: tuple):
        k = CacheEngineKey(*fields, "0")   # validates once for every key that uses it
        self.fields = fields
        self.strlen = len(k.to_string()) - 1


class Tables:
    """Prefixes and layouts met while loading, numbered across files (-1: unusable)."""

    def __init__(self):
        self.prefix_ids: dict[tuple, int] = {}
        self.prefixes: list[_Prefix] = []
        self.layout_ids: dict[tuple, int] = {}
        self.layouts: list[Layout] = []

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
                v = Layout(lay)
            except (GdsKvCacheError, ValueError) as e:
                log.warning("index layout %r unusable here (%s); records that use it are skipped", lay, e)
                g = -1
            else:
                g = len(self.layouts)
                self.layouts.append(v)
            self.layout_ids[lay] = g
        return g

    def remember(self, table_slots: dict[tuple, int], valid_layouts: dict[tuple, Layout]) -> None:
        """Note each usable prefix and layout met in a writer's caches (its table entry's slots, its validation)."""
        for fields, g in self.prefix_ids.items():
            if g >= 0:
                table_slots[fields] = def_span(prefix_payload(fields))
        for lay, g in self.layout_ids.items():
            if g >= 0:
                table_slots[lay] = def_span(layout_payload(lay))
                valid_layouts[lay] = self.layouts[g]
