"""``MemoryObj``: a reference-counted view of one extent of a slab."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from .format import MemoryFormat

if TYPE_CHECKING:  # pragma: no cover
    from .allocator import SlabMemoryAllocator
    from .buffers import SlabBuffer

__all__ = ["MemoryObj"]


class MemoryObj:
    """A chunk's bytes inside a slab.

    Attributes
    ----------
    shape, dtype, fmt
        The logical tensor this object holds.
    offset
        Byte offset in the slab (4 KiB-aligned).
    phys_size
        Bytes reserved (``nbytes`` rounded up to 4 KiB).
    nbytes
        Logical bytes: ``prod(shape) * dtype.itemsize``.

    Notes
    -----
    The allocator returns an object holding one reference, owned by the
    caller. Whoever keeps the object beyond a call takes a reference with
    ``ref_count_up()`` and gives it back with ``ref_count_down()``; the extent
    returns to the slab when the count reaches zero. Touching ``tensor`` after
    that is a bug, caught by ``valid``.
    """

    __slots__ = ("_alloc", "offset", "phys_size", "nbytes", "shape", "dtype", "fmt", "_refs", "_tensor")

    def __init__(self, alloc: "SlabMemoryAllocator", offset: int, phys_size: int,
                 shape: torch.Size, dtype: torch.dtype, fmt: MemoryFormat):
        self._alloc = alloc
        self.offset = offset
        self.phys_size = phys_size
        self.shape = shape
        self.dtype = dtype
        self.fmt = fmt
        self.nbytes = math.prod(shape) * dtype.itemsize
        self._refs = 1
        self._tensor: Optional[torch.Tensor] = None

    # -- reference counting -------------------------------------------------
    def ref_count_up(self) -> None:
        self._alloc._ref_up(self)

    def ref_count_down(self) -> None:
        self._alloc._ref_down(self)

    def get_ref_count(self) -> int:
        return self._refs

    @property
    def valid(self) -> bool:
        return self._refs > 0

    # -- views ------------------------------------------------------------
    @property
    def slab(self) -> "SlabBuffer":
        """The slab this object lies in (``offset`` counts from its start): what I/O engines
        attach to and the batched checksum reads."""
        return self._alloc.buffer

    @property
    def raw_data(self) -> torch.Tensor:
        """All ``phys_size`` bytes as ``uint8`` (includes the alignment tail)."""
        return self._alloc.buffer.tensor[self.offset:self.offset + self.phys_size]

    @property
    def byte_array(self) -> torch.Tensor:
        """The ``nbytes`` logical bytes as ``uint8``."""
        return self._alloc.buffer.tensor[self.offset:self.offset + self.nbytes]

    @property
    def tensor(self) -> torch.Tensor:
        """The chunk as a tensor of ``shape`` and ``dtype`` (a view; no copy)."""
        if self._tensor is None:
            self._tensor = self.byte_array.view(self.dtype).view(self.shape)
        return self._tensor

    @property
    def device(self) -> torch.device:
        return self._alloc.buffer.device

    @property
    def metadata(self) -> dict:
        return {"shape": tuple(self.shape), "dtype": self.dtype, "fmt": self.fmt,
                "nbytes": self.nbytes, "phys_size": self.phys_size}

    def __repr__(self) -> str:
        return (f"MemoryObj(shape={tuple(self.shape)}, dtype={self.dtype}, fmt={self.fmt.name}, "
                f"offset={self.offset}, phys_size={self.phys_size}, refs={self._refs})")
