"""The load/store specs the scheduler side hands the workers (pickled across processes), and the
channel's converters of the library's chunk descriptor (``DiskEntry``).

They subclass vLLM's ``LoadStoreSpec`` where vLLM is installed; without it
(a GPU test machine driving the worker directly) a plain base stands in, so
the worker's data path can run without vLLM. A chunk crosses the channel as
a plain tuple (``entry_to_wire``) and a store's result as a dict
(``stored_fields``); ``entry_from_wire`` and ``entry_from_stored`` are the
only readers of either.
"""

from __future__ import annotations

from typing import Optional

from ...key import CacheEngineKey
from ...memory.format import dtype_to_str
from ...storage.disk_index import DiskEntry

try:
    from vllm.v1.kv_offload.base import LoadStoreSpec
except ImportError:  # vLLM absent: only the worker's data path is used
    class LoadStoreSpec:  # type: ignore[no-redef]
        """Stand-in for vLLM's marker base class."""

__all__ = ["DiskStoreSpec", "DiskLoadSpec", "entry_from_stored", "entry_from_wire", "entry_to_wire",
           "stored_fields"]


def entry_to_wire(e: Optional[DiskEntry]) -> Optional[tuple]:
    """A load spec's item for chunk ``e`` (None stays None: a chunk the index no longer has)."""
    if e is None:
        return None
    return (e.key.to_string(), e.offset, e.nbytes, e.phys_size, tuple(e.shape), e.checksum, e.dtype, e.fmt)


def entry_from_wire(t: tuple) -> DiskEntry:
    """The chunk descriptor of a load spec's item (``entry_to_wire``'s inverse)."""
    key, offset, nbytes, phys, shape, checksum, dtype, fmt = t
    return DiskEntry(CacheEngineKey.from_string(key), int(offset), int(nbytes), int(phys), tuple(shape), dtype, fmt,
                     int(checksum))


def stored_fields(obj, checksum: int) -> dict:
    """A store result's record of one chunk written from slab object ``obj``."""
    return {"nbytes": obj.nbytes, "shape": list(obj.shape), "dtype": dtype_to_str(obj.dtype),
            "fmt": obj.fmt.name, "checksum": int(checksum)}


def entry_from_stored(key: CacheEngineKey, offset: int, phys_size: int, w: dict) -> Optional[DiskEntry]:
    """The index entry of a chunk a worker reported written at ``offset``; None when the record
    does not fit the extent that was reserved for it (never recorded)."""
    try:
        nbytes = int(w["nbytes"])
        e = DiskEntry(key, offset, nbytes, phys_size, tuple(int(d) for d in w["shape"]), str(w["dtype"]),
                      str(w["fmt"]), int(w["checksum"]))
    except (KeyError, TypeError, ValueError):
        return None
    return e if 0 < nbytes <= phys_size else None


class DiskStoreSpec(LoadStoreSpec):
    """Where a store job writes: per shard, ``(key, offset, phys_size)`` of each chunk in
    ``keys_to_store`` order. ``token`` names the job's result file (see ``channel``); ``groups``
    the KV cache group of each chunk (its index among the offloaded groups; None: all group 0)."""

    def __init__(self, token: str, extents: list[list[tuple[str, int, int]]], groups: Optional[list[int]] = None):
        self.token = token
        self.extents = extents
        self.groups = groups

    def __repr__(self) -> str:
        return f"DiskStoreSpec({self.token}, {len(self.extents[0]) if self.extents else 0} chunk(s))"


class DiskLoadSpec(LoadStoreSpec):
    """What a load job reads: per shard, per chunk ``entry_to_wire(entry)``, or None for a chunk the
    index no longer has (the worker fails its blocks); ``groups`` as in ``DiskStoreSpec``."""

    def __init__(self, token: str, chunks: list[list[Optional[tuple]]], groups: Optional[list[int]] = None):
        self.token = token
        self.chunks = chunks
        self.groups = groups

    def __repr__(self) -> str:
        return f"DiskLoadSpec({self.token}, {len(self.chunks[0]) if self.chunks else 0} chunk(s))"
