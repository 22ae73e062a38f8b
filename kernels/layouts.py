"""Paged KV layouts reduced to one geometry: per-layer base + strides + a contiguous row.

Every supported layout stores, for each (kv, layer, block, offset-in-block),
one contiguous row of ``num_kv_heads * head_size`` elements. Pack and unpack
only need where each row starts, so a layout is described by per-layer base
addresses and three byte strides (kv, block, token-in-block).

Layouts (``kv_caches`` argument):

``vllm``
    list of per-layer ``[2, num_blocks, block_size, num_kv_heads, head_size]``
``flashinfer``
    list of per-layer ``[num_blocks, 2, block_size, num_kv_heads, head_size]``
``mla``
    list of per-layer ``[num_blocks, block_size, head_size]``
``cross_layer``
    one ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_size]``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from gds_kvcache.errors import ShapeMismatchError

__all__ = ["LAYOUTS", "PagedGeometry", "describe", "chunk_shape", "layer_half"]

LAYOUTS = ("vllm", "flashinfer", "mla", "cross_layer")


@dataclass(frozen=True)
class PagedGeometry:
    """Byte geometry of a paged KV cache.

    ``layer_offsets`` are byte offsets of each layer's base from ``base_ptr``
    (the lowest layer address), so kernels address every layer through one
    base pointer and an offsets array.
    """

    kv: int
    num_layers: int
    num_blocks: int
    block_size: int
    row_elems: int
    dtype: torch.dtype
    base_ptr: int
    span: int
    layer_offsets: tuple
    stride_kv: int
    stride_block: int
    stride_tok: int
    device: torch.device

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.dtype.itemsize

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @cached_property
    def addr_gcd(self) -> int:
        """The gcd of the row size, the strides, the base address and every layer offset (bytes)."""
        return math.gcd(self.row_bytes, self.stride_kv, self.stride_block, self.stride_tok, self.base_ptr,
                        *self.layer_offsets)


def _row_contiguous(t: torch.Tensor, dims: int, what: str) -> None:
    expect = 1
    for d in range(t.dim() - 1, t.dim() - 1 - dims, -1):
        if t.size(d) != 1 and t.stride(d) != expect:
            raise ShapeMismatchError(f"{what}: the last {dims} dims must be contiguous (strides {t.stride()})")
        expect *= t.size(d)


def describe(layout: str, kv_caches) -> PagedGeometry:
    """The geometry of ``kv_caches`` in ``layout``; raises ``ShapeMismatchError`` on a mismatch."""
    if layout not in LAYOUTS:
        raise ShapeMismatchError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if layout == "cross_layer":
        t = kv_caches if isinstance(kv_caches, torch.Tensor) else None
        if t is None or t.dim() != 6 or t.size(2) != 2:
            raise ShapeMismatchError("cross_layer expects one tensor [num_blocks, L, 2, block_size, H, D]")
        _row_contiguous(t, 2, "cross_layer")
        es = t.element_size()
        nb, nl, _, bs, h, d = t.shape
        offs = tuple(l * t.stride(1) * es for l in range(nl))
        return PagedGeometry(2, nl, nb, bs, h * d, t.dtype, t.data_ptr(), _span(t), offs, t.stride(2) * es,
                             t.stride(0) * es, t.stride(3) * es, t.device)
    layers = list(kv_caches)
    if not layers or not all(isinstance(x, torch.Tensor) for x in layers):
        raise ShapeMismatchError(f"{layout} expects a non-empty list of per-layer tensors")
    t0 = layers[0]
    for i, t in enumerate(layers):
        if t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype or t.device != t0.device:
            raise ShapeMismatchError(f"layer {i} differs from layer 0 in shape, strides, dtype or device")
    es = t0.element_size()
    if layout == "vllm":
        if t0.dim() != 5 or t0.size(0) != 2:
            raise ShapeMismatchError(f"vllm expects [2, num_blocks, block_size, H, D] per layer, got {tuple(t0.shape)}")
        _row_contiguous(t0, 2, "vllm")
        kv, nb, bs, rows = 2, t0.size(1), t0.size(2), t0.size(3) * t0.size(4)
        skv, sblk, stok = t0.stride(0), t0.stride(1), t0.stride(2)
    elif layout == "flashinfer":
        if t0.dim() != 5 or t0.size(1) != 2:
            raise ShapeMismatchError(
                f"flashinfer expects [num_blocks, 2, block_size, H, D] per layer, got {tuple(t0.shape)}")
        _row_contiguous(t0, 2, "flashinfer")
        kv, nb, bs, rows = 2, t0.size(0), t0.size(2), t0.size(3) * t0.size(4)
        skv, sblk, stok = t0.stride(1), t0.stride(0), t0.stride(2)
    else:  # mla
        if t0.dim() != 3:
            raise ShapeMismatchError(
                f"mla expects [num_blocks, block_size, head_size] per layer, got {tuple(t0.shape)}")
        _row_contiguous(t0, 1, "mla")
        kv, nb, bs, rows = 1, t0.size(0), t0.size(1), t0.size(2)
        skv, sblk, stok = 0, t0.stride(0), t0.stride(1)
    ptrs = [t.data_ptr() for t in layers]
    base = min(ptrs)
    span = max(p + _span(t) for p, t in zip(ptrs, layers)) - base
    return PagedGeometry(kv, len(layers), nb, bs, rows, t0.dtype, base, span, tuple(p - base for p in ptrs),
                         skv * es, sblk * es, stok * es, t0.device)


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to one past its last."""
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def chunk_shape(geom: PagedGeometry, num_tokens: int) -> torch.Size:
    """``[2, L, T, H*D]`` (KV_2LTD) or ``[1, L, T, D]`` (KV_MLA_FMT) for ``num_tokens`` tokens."""
    return torch.Size((geom.kv, geom.num_layers, num_tokens, geom.row_elems))


def layer_half(geom: PagedGeometry, layer: int, half: int) -> PagedGeometry:
    """Layer ``layer``'s K (``half`` 0) or V (1) of ``geom`` as a one-layer ``mla``-layout geometry
    (``[num_blocks, block_size, row]``, slot numbering unchanged): what ``describe("mla", [view])``
    returns for that half's view, worked out without a tensor."""
    if not (0 <= layer < geom.num_layers and 0 <= half < geom.kv):
        raise ShapeMismatchError(f"layer {layer}, half {half} out of range for {geom.num_layers} layers x "
                                 f"{geom.kv} halves")
    span = 0
    if geom.num_blocks and geom.block_size and geom.row_elems:
        span = (geom.num_blocks - 1) * geom.stride_block + (geom.block_size - 1) * geom.stride_tok + geom.row_bytes
    base = geom.base_ptr + geom.layer_offsets[layer] + half * geom.stride_kv
    return replace(geom, kv=1, num_layers=1, base_ptr=base, span=span, layer_offsets=(0,), stride_kv=0)


def word_bytes(geom: PagedGeometry, chunk: torch.Tensor) -> int:
    """Widest copy unit (8, 4, 2 or 1 bytes) that divides every address, stride and row."""
    g = math.gcd(geom.addr_gcd, chunk.data_ptr())
    for w in (8, 4, 2, 1):
        if g % w == 0:
            return w
    return 1
