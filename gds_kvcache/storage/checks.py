"""Argument checks of the disk tier's API: keys, chunks to store, LMCache's chunk paths.

Each check raises the library's error for a bad argument before any state
changes (no reservation, no claim, no I/O), so a refused call leaves nothing
behind. They read nothing but their arguments.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..errors import GdsKvCacheError, KeyFormatError, ShapeMismatchError
from ..key import CacheEngineKey
from ..memory.obj import MemoryObj

__all__ = ["check_keys", "check_chunks", "key_from_path"]


def check_keys(keys: Sequence) -> None:
    """Raise ``KeyFormatError`` unless every key is a ``CacheEngineKey``."""
    for k in keys:
        if not isinstance(k, CacheEngineKey):
            raise KeyFormatError(f"a key must be a CacheEngineKey, got {type(k).__name__} {k!r}")


def check_chunks(objs: Sequence[MemoryObj], slab) -> None:
    """Raise unless every object can be stored by a tier over ``slab`` (live, non-empty, in it)."""
    for o in objs:
        if not isinstance(o, MemoryObj):
            raise GdsKvCacheError(f"a chunk must be a MemoryObj, got {type(o).__name__}")
        if not o.valid:
            raise GdsKvCacheError(f"{o!r} was already freed")
        if o.nbytes <= 0:
            raise ShapeMismatchError(f"cannot store an empty chunk (shape {tuple(o.shape)})")
        if o.slab is not slab:
            raise GdsKvCacheError("the chunk was not allocated from this backend's memory_allocator")


def key_from_path(path: str) -> CacheEngineKey:
    """The key an LMCache chunk path names (its base name is the key string)."""
    name = os.path.basename(str(path))
    try:
        return CacheEngineKey.from_string(name)
    except KeyFormatError as e:
        raise KeyFormatError(f"{path!r} names no chunk of this backend: {e}") from None
