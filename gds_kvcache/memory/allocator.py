"""Slab allocator: ``MemoryObj`` extents carved out of one big buffer."""

from __future__ import annotations

import abc
import math
import threading
from typing import Optional

import torch

from .buffers import SlabBuffer
from .extents import ExtentAllocator
from .format import MemoryFormat
from .obj import MemoryObj

__all__ = ["MemoryAllocatorInterface", "SlabMemoryAllocator", "allocate_batch"]


class MemoryAllocatorInterface(abc.ABC):
    """What the storage tiers rely on from an allocator: one slab, 4 KiB-aligned objects.

    Every object an allocator hands out is a view of its one ``buffer``; the
    I/O engines attach to that buffer once and move spans of it, and the
    checksum kernel reads it in one launch per batch. ``kind`` says where the
    buffer lives (``cuda``, ``pinned`` or ``host``) so a tier can pick its I/O
    path; ``capacity`` and ``free_bytes`` let callers size batches and make
    room for reads before they ask.

    Notes
    -----
    Allocation never raises for "no room" and never waits: it returns None
    (or a shorter prefix, for ``batched_allocate``) and the caller evicts or
    gives up.
    """

    @abc.abstractmethod
    def allocate(self, shape, dtype: torch.dtype,
                 fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> Optional[MemoryObj]:
        """A new object holding one reference, or None when there is no room."""

    def batched_allocate(self, shapes, dtypes, fmts) -> list[MemoryObj]:
        """Objects for the parallel lists ``shapes``/``dtypes``/``fmts``; a prefix of them (all,
        or as many as fit, in order). The default allocates one at a time; a slab allocator
        places them adjacently so a batch moves as one transfer."""
        out = []
        for s, d, f in zip(shapes, dtypes, fmts):
            o = self.allocate(s, d, f)
            if o is None:
                break
            out.append(o)
        return out

    @abc.abstractmethod
    def free(self, obj: MemoryObj) -> None:
        """Return the object's extent regardless of its reference count."""

    @abc.abstractmethod
    def memcheck(self) -> bool:
        """Verify internal invariants; raise ``AssertionError`` if broken."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where allocated objects live."""

    @property
    @abc.abstractmethod
    def buffer(self) -> SlabBuffer:
        """The one slab every object of this allocator lies in."""

    @property
    def kind(self) -> str:
        """``cuda``, ``pinned`` or ``host``: where ``buffer`` lives."""
        return self.buffer.kind

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Bytes the slab can hand out in all."""

    @property
    @abc.abstractmethod
    def free_bytes(self) -> int:
        """Bytes not handed out now (in pieces: a batch may still not fit)."""


class SlabMemoryAllocator(MemoryAllocatorInterface):
    """4 KiB-aligned objects from one CUDA, pinned-host or host buffer.

    Parameters
    ----------
    nbytes
        Slab size in bytes.
    kind
        ``cuda``, ``pinned`` or ``host``.
    cuda_device
        Device index for ``cuda``.

    Notes
    -----
    Allocation never raises for "no room": it returns None and the caller
    evicts or gives up; it never waits and never calls into a storage tier
    (back-pressure is the storage manager's job). The lock is held only for
    the free-list update, never across I/O or device work. Registration with
    cuFile is the KvikIO engine's business (it knows whether GDS will run).
    ``close()`` releases the slab memory at once.
    """

    def __init__(self, nbytes: int, kind: str = "host", cuda_device: int = 0):
        self._buffer = SlabBuffer(nbytes, kind, cuda_device)
        self._extents = ExtentAllocator(self._buffer.nbytes)
        self._lock = threading.Lock()
        self._live: dict[int, MemoryObj] = {}
        self._closed = False

    @property
    def buffer(self) -> SlabBuffer:
        return self._buffer

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def capacity(self) -> int:
        return self._extents.capacity

    @property
    def used(self) -> int:
        return self._extents.used

    @property
    def free_bytes(self) -> int:
        return self._extents.free

    def allocate(self, shape, dtype: torch.dtype,
                 fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> Optional[MemoryObj]:
        shape = torch.Size(shape)
        nbytes = max(1, math.prod(shape) * dtype.itemsize)
        with self._lock:
            if self._closed:
                return None
            off = self._extents.allocate(nbytes)
            if off is None:
                return None
            obj = MemoryObj(self, off, self._extents.allocated_size(off), shape, dtype, fmt)
            self._live[off] = obj
        return obj

    def batched_allocate(self, shapes, dtypes, fmts) -> list[MemoryObj]:
        """Objects for ``shapes``/``dtypes``/``fmts`` (parallel lists), adjacent in the slab where
        one free region holds them all, so a batch moves as one transfer.

        Returns a prefix: as many objects as fit, in order (empty when none does).
        """
        shapes = [torch.Size(s) for s in shapes]
        sizes = [max(1, math.prod(s) * d.itemsize) for s, d in zip(shapes, dtypes)]
        out: list[MemoryObj] = []
        with self._lock:
            if self._closed:
                return out
            offs = self._extents.allocate_run(sizes) if len(sizes) > 1 else None
            for i, (shape, dtype, fmt) in enumerate(zip(shapes, dtypes, fmts)):
                off = offs[i] if offs is not None else self._extents.allocate(sizes[i])
                if off is None:
                    break
                obj = MemoryObj(self, off, self._extents.allocated_size(off), shape, dtype, fmt)
                self._live[off] = obj
                out.append(obj)
        return out

    def free(self, obj: MemoryObj) -> None:
        with self._lock:
            self._release(obj)

    def _release(self, obj: MemoryObj) -> None:
        if self._live.get(obj.offset) is not obj:
            raise ValueError(f"{obj!r} is not live in this allocator (double free?)")
        del self._live[obj.offset]
        self._extents.free_extent(obj.offset)
        obj._refs = 0
        obj._tensor = None

    def _ref_up(self, obj: MemoryObj) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"ref_count_up on {obj!r}: its slab was closed")
            if obj._refs <= 0:
                raise ValueError(f"ref_count_up on a freed object {obj!r}")
            obj._refs += 1

    def _ref_down(self, obj: MemoryObj) -> None:
        with self._lock:
            if self._closed:
                return  # the slab is gone already; a late release is harmless
            if obj._refs <= 0:
                raise ValueError(f"ref_count_down on a freed object {obj!r}")
            obj._refs -= 1
            if obj._refs == 0:
                self._release(obj)

    def live_objects(self) -> int:
        return len(self._live)

    def memcheck(self) -> bool:
        with self._lock:
            self._extents.memcheck()
            ext = self._extents.extents()
            assert set(ext) == set(self._live), "live objects and allocated extents disagree"
            for off, obj in self._live.items():
                assert obj._refs > 0, f"live object with ref count {obj._refs} at {off}"
                assert ext[off] == obj.phys_size >= obj.nbytes, f"size mismatch at {off}"
        return True

    def close(self) -> None:
        """Release the slab memory now; objects still held become invalid."""
        with self._lock:
            self._closed = True
            for obj in self._live.values():
                obj._refs = 0
                obj._tensor = None
            self._live.clear()
        self._buffer.close()


def allocate_batch(allocator: MemoryAllocatorInterface, shapes, dtypes, fmts) -> list[MemoryObj]:
    """``allocator.batched_allocate`` (kept for callers of the earlier helper)."""
    return allocator.batched_allocate(shapes, dtypes, fmts) if shapes else []
