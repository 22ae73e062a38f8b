"""Numba kernels shipped as ``gds_kvcache.kernels``: checksums and paged-KV pack/unpack."""

from .checksum import checksum, checksum_batch, checksum_cuda, checksum_host
from .layouts import LAYOUTS, PagedGeometry, chunk_shape, describe, layer_half
from .paged import geometry, launch_path, pack, unpack

__all__ = [
    "LAYOUTS",
    "PagedGeometry",
    "checksum",
    "checksum_batch",
    "checksum_cuda",
    "checksum_host",
    "chunk_shape",
    "describe",
    "geometry",
    "launch_path",
    "layer_half",
    "pack",
    "unpack",
]
