"""``pack`` (paged -> chunk) and ``unpack`` (chunk -> paged), on whatever device the tensors live.

Both take a ``slot_mapping`` (``slot = block_id * block_size + offset``;
negative slots are skipped) and a chunk tensor ``[K, L, T, row]`` that is
usually an allocator ``MemoryObj.tensor``, so the KV goes straight between
the serving engine's cache and the slab with no intermediate copy.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from gds_kvcache.errors import ShapeMismatchError

from .layouts import PagedGeometry, chunk_shape, describe, word_bytes

__all__ = ["geometry", "pack", "unpack"]

_WORD = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}


class _DeviceSpan:
    """A raw device address range seen as a 1-D array (CUDA array interface)."""

    def __init__(self, ptr: int, n: int, w: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": np.dtype(_WORD[w]).str, "data": (ptr, False),
                                         "strides": None, "version": 3, "stream": None}


def _host_span(ptr: int, nbytes: int, w: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=np.uint8).view(_WORD[w])


def _span(ptr: int, nbytes: int, w: int, on_gpu: bool):
    nbytes = (nbytes + w - 1) // w * w
    if on_gpu:
        from numba import cuda

        return cuda.as_cuda_array(_DeviceSpan(ptr, nbytes // w, w))
    return _host_span(ptr, nbytes, w)


_GEOMS: dict = {}
_VIEWS: dict = {}


def _layer_views(geom: PagedGeometry, w: int, on_gpu: bool):
    """(paged span, layer offsets) as kernel arguments, made once per geometry and word size.

    Building them per call would copy the offsets to the GPU with a blocking
    copy that waits for the previous kernel, serialising back-to-back calls.
    """
    key = (geom, w, on_gpu)
    v = _VIEWS.get(key)
    if v is None:
        offs = torch.tensor([o // w for o in geom.layer_offsets], dtype=torch.int64, device=geom.device)
        paged = _span(geom.base_ptr, geom.span, w, on_gpu)
        if on_gpu:
            from numba import cuda

            v = (paged, cuda.as_cuda_array(offs), offs)
        else:
            v = (paged, offs.numpy(), offs)
        if len(_VIEWS) > 64:
            _VIEWS.clear()
        _VIEWS[key] = v
    return v[0], v[1]


def geometry(layout: str, kv_caches) -> PagedGeometry:
    """``describe`` once per cache: serving engines pass the same tensors on every call."""
    layers = (kv_caches,) if isinstance(kv_caches, torch.Tensor) else tuple(kv_caches)
    try:
        key = (layout, tuple(t.data_ptr() for t in layers), tuple(layers[0].shape), layers[0].stride(),
               layers[0].dtype)
    except (AttributeError, IndexError):
        return describe(layout, kv_caches)
    geom = _GEOMS.get(key)
    if geom is None:
        geom = describe(layout, kv_caches)
        if len(_GEOMS) > 64:
            _GEOMS.clear()
        _GEOMS[key] = geom
    return geom


def _prepare(kv_caches, layout: str, slot_mapping, chunk: torch.Tensor, check: bool):
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


def launch_shape(row_words: int, kv_layers: int, nt: int, sms: int = 132) -> tuple[tuple[int, int], tuple[int, int]]:
    """CUDA grid and block: a warp per row (fewer threads for short rows), 256 threads per
    block, and about eight resident blocks per multiprocessor in all."""
    tx = min(32, max(4, 1 << max(0, (-(-row_words // 8) - 1).bit_length())))
    ty = 256 // tx
    gx = max(1, min(-(-nt // ty), -(-sms * 8 // kv_layers), 65535))
    return (gx, kv_layers), (tx, ty)


def _run(geom: PagedGeometry, slots: torch.Tensor, nt: int, chunk: torch.Tensor, unpack_: bool,
         backend: str) -> None:
    if nt == 0:
        return
    w = word_bytes(geom, chunk)
    on_gpu = geom.device.type == "cuda"
    paged, offs = _layer_views(geom, w, on_gpu)
    flat = _span(chunk.data_ptr(), chunk.numel() * chunk.element_size(), w, on_gpu)
    # Each token's row offset inside a layer, once per call, so kernels never divide.
    blk = torch.div(slots, geom.block_size, rounding_mode="floor")
    # Out-of-range slots (possible only with check=False) are never touched.
    tok_off = torch.where((slots >= 0) & (slots < geom.num_slots), blk * (geom.stride_block // w) +
                          (slots - blk * geom.block_size) * (geom.stride_tok // w), -1)
    row = geom.row_bytes // w
    args = (geom.stride_kv // w, geom.kv, geom.num_layers, nt, row, not unpack_)
    if backend == "cuda":
        from numba import cuda

        from .paged_cuda import move_rows_cuda as kern

        if on_gpu:
            sms = _sm_count(geom.device)
            grid, block = launch_shape(row, geom.kv * geom.num_layers, nt, sms)
            stream = cuda.external_stream(torch.cuda.current_stream(geom.device).cuda_stream)
            kern[grid, block, stream](paged, offs, args[0], cuda.as_cuda_array(tok_off), flat, *args[1:])
        else:  # Numba's CUDA simulator, on host arrays
            grid, block = launch_shape(row, geom.kv * geom.num_layers, nt, 1)
            kern[grid, block](paged, offs, args[0], tok_off.numpy(), flat, *args[1:])
        return
    from .paged_cpu import move_rows_cpu

    move_rows_cpu(paged, offs, args[0], tok_off.numpy(), flat, *args[1:])


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _backend(device: torch.device, backend: str) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type == "cuda":
        raise ShapeMismatchError("backend='cpu' needs host tensors")
    return backend


def pack(kv_caches, layout: str, slot_mapping, chunk: torch.Tensor, backend: str = "auto",
         check: bool = True) -> torch.Tensor:
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

    Notes
    -----
    GPU launches go on torch's current stream and return without waiting.
    The cache geometry is worked out once per set of cache tensors.
    """
    geom, slots, nt = _prepare(kv_caches, layout, slot_mapping, chunk, check)
    _run(geom, slots, nt, chunk, False, _backend(geom.device, backend))
    return chunk


def unpack(chunk: torch.Tensor, kv_caches, layout: str, slot_mapping, backend: str = "auto",
           check: bool = True) -> None:
    """Scatter ``chunk``'s rows into the paged cache at ``slot_mapping``; negative slots are skipped.

    Arguments as for ``pack``.
    """
    geom, slots, nt = _prepare(kv_caches, layout, slot_mapping, chunk, check)
    _run(geom, slots, nt, chunk, True, _backend(geom.device, backend))
