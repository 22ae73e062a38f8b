"""Numba kernels shipped as ``gds_kvcache.kernels``: checksums and paged-KV pack/unpack."""

from .checksum import checksum, checksum_cuda, checksum_host

__all__ = ["checksum", "checksum_cuda", "checksum_host"]
