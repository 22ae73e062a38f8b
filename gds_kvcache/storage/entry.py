"""The library's chunk descriptor, :class:`DiskEntry`, and :class:`IndexEntryError`.

One ``DiskEntry`` says where one chunk lives in the disk pool and what it is.
The disk index keeps one per chunk, the on-disk index (``index_log``) records
their persisted fields, and the vLLM channel hands them across processes.
Its ``checksum`` is bound to its ``key`` (``keyed_checksum``): the same bytes
under another key check differently. This module holds only the type: how its fields are laid out on disk is
described in ``index_codec``, and what values they may take is checked there
(``check_entry``) before anything is recorded.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

from ..errors import GdsKvCacheError
from ..key import CacheEngineKey

__all__ = ["DiskEntry", "IndexEntryError", "keyed_checksum", "key_hash"]


def key_hash(name: bytes) -> int:
    """The 64-bit hash of a key string (``keyed_checksum``'s): two CRC-32s, stable everywhere."""
    return zlib.crc32(name) | (zlib.crc32(name, 0x9E3779B9) << 32)


@functools.lru_cache(maxsize=1 << 16)
def _key_hash(key) -> int:
    return key_hash((key.to_string() if hasattr(key, "to_string") else str(key)).encode())


def keyed_checksum(raw: int, key) -> int:
    """A chunk's checksum bound to its key: ``raw`` (the bytes' 64-bit checksum) XOR a 64-bit
    hash of the key (a ``CacheEngineKey`` or its string), so the same bytes under another key
    check differently (unless the two keys' hashes collide, one in 2**64).

    What the index, Redis and the vLLM channel record; every read compares against it. The key
    hash is two CRC-32s of the key string (stable across processes and versions), cached for
    the 65,536 keys last used: about 0.3 us a chunk on a hit.
    """
    return raw ^ _key_hash(key)



class IndexEntryError(GdsKvCacheError, ValueError):
    """An entry handed to :class:`~.index_log.IndexLog` cannot be recorded (a bug in the caller)."""


@dataclass(slots=True, weakref_slot=True)
class DiskEntry:
    """Where one chunk lives in the pool, and what it is.

    Attributes
    ----------
    key
        The chunk's key.
    offset
        Logical pool offset of its bytes, a multiple of 4 KiB.
    nbytes
        Logical bytes of the chunk (> 0): ``prod(shape)`` times the dtype's itemsize.
    phys_size
        Bytes of the pool extent it takes: ``nbytes`` rounded up to 4 KiB (or
        more); a multiple of 4 KiB.
    shape
        The tensor shape (ints >= 0; a ``tuple``, as the index gives it back).
    dtype
        The dtype's name, as ``memory.format.dtype_to_str`` gives it.
    fmt
        The ``MemoryFormat`` member's name.
    checksum
        A 64-bit unsigned checksum of the chunk's bytes.
    seq
        Order of the put (recency); assigned by ``IndexLog.append``, kept by
        ``IndexLog.snapshot``.
    readers, doomed, row
        Runtime state of the disk index, never written to disk: the reads
        in flight that keep the extent alive, whether the entry was dropped
        while read (its extent is freed when the last read ends), and where
        the index keeps it (-1: nowhere, or not said).

    Notes
    -----
    The disk index keeps its entries as arrays and makes a ``DiskEntry``
    only for a chunk a caller asks about; while any caller holds it, the
    index hands out that same object (it keeps a weak reference).
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
    row: int = field(default=-1, compare=False, repr=False)   # runtime only: the index's row of it
