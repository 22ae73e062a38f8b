"""Chunk memory layouts and dtype names that survive a trip to disk."""

from __future__ import annotations

import enum

import torch

from ..errors import ShapeMismatchError

__all__ = ["MemoryFormat", "dtype_to_str", "str_to_dtype"]


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
