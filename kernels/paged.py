"""``pack`` (paged -> chunk) and ``unpack`` (chunk -> paged), on whatever device the tensors live.

Both take a ``slot_mapping`` (``slot = block_id * block_size + offset``;
negative slots are skipped) and a chunk tensor ``[K, L, T, row]`` that is
usually an allocator ``MemoryObj.tensor``, so the KV goes straight between
the serving engine's cache and the slab with no intermediate copy.

Invariants: a cache's geometry is worked out (``describe``) once while it
stays among the ``GEOMETRY_CACHE`` most recently used; memory a queued
kernel reads (the per-layer offsets) is never reused before that kernel ran,
whatever stream it was queued on and whatever the caches drop.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from gds_kvcache.errors import ShapeMismatchError

from .layouts import PagedGeometry, chunk_shape, describe, word_bytes

__all__ = ["geometry", "launch_path", "pack", "unpack"]

_WORD = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}


def _host_span(ptr: int, nbytes: int, w: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8).view(_WORD[w])


#: Most geometries ``geometry`` remembers (least recently used dropped first): a serving engine passes
#: the same few caches on every call.
GEOMETRY_CACHE = 256
#: Most per-layer offsets tensors kept (least recently used dropped first; see ``_layer_offsets``).
OFFSETS_CACHE = 64

_lock = threading.Lock()
_GEOMS: OrderedDict = OrderedDict()
_OFFSETS: OrderedDict = OrderedDict()


def _layer_offsets(geom: PagedGeometry, w: int) -> torch.Tensor:
    """Per-layer start offsets in words on the cache's device, made once per distinct offsets and word size.

    Building them per call would copy the offsets to the GPU with a blocking
    copy that waits for the previous kernel, serialising back-to-back calls.
    Keyed by value, so every one-layer geometry (``layer_half``) shares one
    tensor. A tensor dropped from the cache may still be read by kernels
    queued on any stream: ``_device_args`` records each launch's stream on it
    (``record_stream``), so its memory is reused only after those kernels ran.
    """
    key = (geom.device, w, tuple(o // w for o in geom.layer_offsets))
    with _lock:
        v = _OFFSETS.get(key)
        if v is not None:
            _OFFSETS.move_to_end(key)
            return v
    v = torch.tensor(key[2], dtype=torch.int64, device=geom.device)
    with _lock:
        v = _OFFSETS.setdefault(key, v)
        while len(_OFFSETS) > OFFSETS_CACHE:
            _OFFSETS.popitem(last=False)
    return v


def geometry(layout: str, kv_caches) -> PagedGeometry:
    """``describe`` once per cache: serving engines pass the same tensors on every call."""
    layers = (kv_caches,) if isinstance(kv_caches, torch.Tensor) else tuple(kv_caches)
    try:
        key = (layout, tuple(t.data_ptr() for t in layers), tuple(layers[0].shape), layers[0].stride(),
               layers[0].dtype)
    except (AttributeError, IndexError):
        return describe(layout, kv_caches)
    with _lock:
        geom = _GEOMS.get(key)
        if geom is not None:
            _GEOMS.move_to_end(key)
            return geom
    geom = describe(layout, kv_caches)
    with _lock:
        _GEOMS[key] = geom
        while len(_GEOMS) > GEOMETRY_CACHE:
            _GEOMS.popitem(last=False)
    return geom


def _prepare(kv_caches, layout: str, slot_mapping, chunk: torch.Tensor, check: bool, geom=None):
    if geom is None:
        geom = geometry(layout, kv_caches)
    slots = torch.as_tensor(slot_mapping)
    if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise ShapeMismatchError("slot_mapping must be a 1-D integer tensor")
    nt = slots.numel()
    want = chunk_shape(geom, nt)
    if tuple(chunk.shape) != tuple(want) or chunk.dtype != geom.dtype:
        raise ShapeMismatchError(f"chunk is {tuple(chunk.shape)} {chunk.dtype}; {layout} cache with {nt} slots "
                                 f"needs {tuple(want)} {geom.dtype}")
    if not chunk.is_contiguous() or chunk.device != geom.device:
        raise ShapeMismatchError(f"chunk must be contiguous on {geom.device}")
    slots = slots.to(device=geom.device, dtype=torch.int64).contiguous()
    if check and nt and int(slots.max()) >= geom.num_slots:
        raise ShapeMismatchError(f"slot {int(slots.max())} out of range for {geom.num_slots} slots")
    return geom, slots, nt


def _cuda_kernel(w: int, device=None):
    """The GPU kernel for ``w``-byte words with its launcher, on ``device`` (default: the current GPU)."""
    from .launch import DeviceSpan, prepared
    from .paged_cuda import move_rows_cuda

    def example():
        span, offs = DeviceSpan(0, 1, _WORD[w]), DeviceSpan(0, 1, np.int64)
        return (span, offs, offs, span) + (0,) * 9 + (True,)

    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    return prepared(move_rows_cuda, dev, example, tag=w)


def _scalar_args(geom: PagedGeometry, w: int, nt: int, unpack_: bool) -> tuple:
    """The kernels' arguments after the four arrays (in ``w``-byte words), in their order."""
    return (geom.stride_kv // w, geom.num_layers, nt, geom.row_bytes // w, geom.block_size,
            geom.stride_block // w, geom.stride_tok // w, geom.num_slots, geom.kv * geom.num_layers * nt,
            not unpack_)


def _device_args(geom: PagedGeometry, w: int, slots: torch.Tensor, nt: int, chunk: torch.Tensor,
                 unpack_: bool, stream) -> tuple:
    """The GPU kernel's arguments: the four arrays as ``(ptr, n)`` pairs, then ``_scalar_args``."""
    offs = _layer_offsets(geom, w)
    # The cache may drop this tensor while the kernel is queued: its memory must wait for ``stream``.
    offs.record_stream(stream)
    return ((geom.base_ptr, -(-geom.span // w)), (offs.data_ptr(), offs.numel()), (slots.data_ptr(), nt),
            (chunk.data_ptr(), chunk.numel() * chunk.element_size() // w)) + _scalar_args(geom, w, nt, unpack_)


def launch_path() -> str:
    """How GPU pack/unpack launch on the current GPU: ``prepared`` (raw arguments straight to
    cuda.core) or ``numba-launch`` (Numba's per-call argument handling; slower, same results)."""
    return _cuda_kernel(8).path


def _run(geom: PagedGeometry, slots: torch.Tensor, nt: int, chunk: torch.Tensor, unpack_: bool,
         backend: str) -> None:
    if nt == 0:
        return
    w = word_bytes(geom, chunk)
    row = geom.row_bytes // w
    nrows = geom.kv * geom.num_layers * nt
    if geom.device.type == "cuda":
        from .paged_cuda import launch_block, launch_grid

        block = launch_block(row) + (1,)
        grid = (launch_grid(nrows, block), 1, 1)
        kern = _cuda_kernel(w, geom.device)
        current = torch.cuda.current_stream(geom.device)
        args = _device_args(geom, w, slots, nt, chunk, unpack_, current)
        stream = current.cuda_stream
        if geom.device.index == torch.cuda.current_device():
            kern(grid, block, stream, args)
        else:  # launch from the cache's own device context
            with torch.cuda.device(geom.device):
                kern(grid, block, stream, args)
        return
    paged = _host_span(geom.base_ptr, -(-geom.span // w) * w, w)
    flat = _host_span(chunk.data_ptr(), chunk.numel() * chunk.element_size(), w)
    host_args = (paged, _layer_offsets(geom, w).numpy(), slots.numpy(), flat) + _scalar_args(geom, w, nt, unpack_)
    if backend == "cuda":  # Numba's CUDA simulator, on host arrays
        from .paged_cuda import launch_block, launch_grid, move_rows_cuda

        block = launch_block(row)
        move_rows_cuda[launch_grid(nrows, block, 2), block](*host_args)
        return
    from .paged_cpu import move_rows_cpu

    move_rows_cpu(*host_args)


def _backend(device: torch.device, backend: str) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type == "cuda":
        raise ShapeMismatchError("backend='cpu' needs host tensors")
    return backend


def pack(kv_caches, layout: str, slot_mapping, chunk: torch.Tensor, backend: str = "auto",
         check: bool = True, geom: Optional[PagedGeometry] = None) -> torch.Tensor:
    """Gather the rows of ``slot_mapping`` from the paged cache into ``chunk``; returns ``chunk``.

    Parameters
    ----------
    kv_caches
        The paged cache in ``layout`` (see ``kernels.layouts``).
    layout
        ``vllm``, ``flashinfer``, ``mla`` or ``cross_layer``.
    slot_mapping
        1-D integer tensor of ``T`` slots; rows of negative slots are left untouched.
    chunk
        Contiguous ``[K, L, T, row]`` tensor of the cache's dtype on its device.
    backend
        ``auto`` (by device), ``cpu`` or ``cuda`` (``cuda`` on host tensors runs
        under Numba's CUDA simulator, for tests).
    check
        Raise ``ShapeMismatchError`` for a slot past the cache. On a GPU this
        reads ``max(slot_mapping)`` back, a sync; pass False after checking the
        whole mapping once (out-of-range slots are then skipped, never accessed).
    geom
        The cache's geometry when the caller has it (``geometry``, ``describe``
        or ``layer_half`` of the very tensors meant): ``kv_caches`` and
        ``layout`` are then not looked at.

    Notes
    -----
    GPU launches go on torch's current stream and return without waiting.
    The cache geometry is worked out once per set of cache tensors.
    """
    geom, slots, nt = _prepare(kv_caches, layout, slot_mapping, chunk, check, geom)
    _run(geom, slots, nt, chunk, False, _backend(geom.device, backend))
    return chunk


def unpack(chunk: torch.Tensor, kv_caches, layout: str, slot_mapping, backend: str = "auto",
           check: bool = True, geom: Optional[PagedGeometry] = None) -> None:
    """Scatter ``chunk``'s rows into the paged cache at ``slot_mapping``; negative slots are skipped.

    Arguments as for ``pack``.
    """
    geom, slots, nt = _prepare(kv_caches, layout, slot_mapping, chunk, check, geom)
    _run(geom, slots, nt, chunk, True, _backend(geom.device, backend))
