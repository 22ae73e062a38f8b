"""Chunk memory layouts and dtype names that survive a trip to disk."""

from __future__ import annotations

import enum

import torch

from ..errors import ShapeMismatchError

__all__ = ["MemoryFormat", "check_dtype", "check_shape", "dtype_to_str", "str_to_dtype"]


class MemoryFormat(enum.Enum):
    """How a chunk's bytes are laid out.

    ``KV_2LTD``: ``[2, L, T, D]`` (K/V, layer, token, heads*head_size);
    ``KV_T2D``: ``[T, 2, D]`` for one layer; ``KV_MLA_FMT``: ``[1, L, T, D]``;
    ``BINARY``: opaque bytes.
    """

    UNDEFINED = 0
    KV_2LTD = 1
    KV_T2D = 2
    KV_MLA_FMT = 3
    BINARY = 4

    def token_dim(self) -> int:
        """Index of the token axis, or -1 where the format has none."""
        return {MemoryFormat.KV_2LTD: 2, MemoryFormat.KV_MLA_FMT: 2, MemoryFormat.KV_T2D: 0}.get(self, -1)


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ShapeMismatchError(f"unknown dtype name {name!r}")
    return dt


def check_dtype(dtype) -> torch.dtype:
    """``dtype`` if it is a ``torch.dtype``, else ``ShapeMismatchError`` saying what was given."""
    if not isinstance(dtype, torch.dtype):
        raise ShapeMismatchError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


def check_shape(shape) -> torch.Size:
    """``shape`` as a ``torch.Size`` of non-negative ints, else ``ShapeMismatchError`` saying why not."""
    try:
        shape = torch.Size(shape)
    except (TypeError, ValueError):
        raise ShapeMismatchError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ShapeMismatchError(f"shape {tuple(shape)} has a negative dimension")
    return shape
