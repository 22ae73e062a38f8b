"""One pool file of the mapped engine: opened, reserved, mapped ``MAP_SHARED``, populated, pinned for DMA.

``MappedFile`` holds a pool file's descriptor, its mapping and the NumPy and
torch views of it; ``register`` pins the mapping with ``cudaHostRegister``
so a CUDA slab moves bytes to and from it by one DMA. ``mapped_engine``
splits spans over these files and copies them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from typing import Optional

import numpy as np

from ..errors import IOEngineError
from ..units import PAGE

__all__ = ["MappedFile"]

log = logging.getLogger(__name__)

#: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+): fault every page in,
#: writable, in one call. Python 3.11's mmap module does not name it.
_MADV_POPULATE_WRITE = 23
#: ``cudaHostRegisterPortable``: pinned for every CUDA context in the
#: process, so slabs on other devices DMA from the same mapping. No
#: ``Mapped`` flag: the engine only copies, kernels never dereference it.
_CUDA_HOST_REGISTER_PORTABLE = 1


def _cuda_check(res, what: str) -> None:
    import torch

    try:
        torch.cuda.check_error(res)
    except torch.cuda.CudaError as e:
        raise IOEngineError(f"{what}: {e}") from None


class MappedFile:
    """One pool file: its descriptor, its ``MAP_SHARED`` mapping and views of it."""

    def __init__(self, path: str, length: Optional[int]):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise IOEngineError(e.errno, f"cannot open {path!r} to map it: {e.strerror}") from None
        self.mm: Optional[mmap.mmap] = None
        self.array: Optional[np.ndarray] = None
        self.tensor = None
        self.registered_ptr: Optional[int] = None
        try:
            self.length = length if length is not None else os.fstat(self.fd).st_size
            if self.length <= 0:
                raise IOEngineError(f"cannot map {path!r}: the file is empty")
            # Every page must exist before the first store: a store into a
            # hole of a full tmpfs is SIGBUS, which kills the process.
            try:
                os.posix_fallocate(self.fd, 0, self.length)
            except OSError as e:
                raise IOEngineError(e.errno, f"cannot reserve {self.length} bytes for {path!r} "
                                             f"before mapping it: {e.strerror}") from None
            try:
                self.mm = mmap.mmap(self.fd, self.length, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise IOEngineError(e.errno, f"cannot map {path!r}: {e.strerror}") from None
            self.array = np.frombuffer(self.mm, dtype=np.uint8)
            self._populate()
        except BaseException:
            self.close()
            raise

    def _populate(self) -> None:
        # First-touch faults on the copy path cost more than the copy (about
        # 3 GB/s against 9 here) and serialise the copy threads on mm locks.
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except OSError as e:
            if e.errno != errno.EINVAL:
                # EFAULT: a page could not be allocated; a store there would be SIGBUS.
                raise IOEngineError(e.errno, f"cannot populate the mapping of {self.path!r}: {e.strerror}") from None
            # Before Linux 5.14: write each page's first byte back (a copy, so
            # NumPy cannot skip it as a self-assignment).
            step = self.array[::PAGE]
            np.copyto(step, step.copy())

    @property
    def addr(self) -> int:
        return self.array.ctypes.data

    def size_now(self) -> int:
        return os.fstat(self.fd).st_size

    def register(self, device) -> None:
        """Pin the mapping for DMA (``cudaHostRegister``) in ``device``'s context."""
        import torch

        if self.registered_ptr is not None:
            return
        with torch.cuda.device(device):
            _cuda_check(torch.cuda.cudart().cudaHostRegister(self.addr, self.length, _CUDA_HOST_REGISTER_PORTABLE),
                        f"cudaHostRegister of the mapping of {self.path!r} ({self.length} bytes)")
        self.registered_ptr = self.addr
        self.tensor = torch.from_numpy(self.array)
        if not self.tensor.is_pinned():
            # A registered range CUDA does not see as pinned would be copied
            # through the driver's staging buffers, not by DMA.
            self.unregister()
            raise IOEngineError(f"the mapping of {self.path!r} was registered but CUDA does not see it as pinned")

    def unregister(self) -> None:
        if self.registered_ptr is None:
            return
        import torch

        ptr, self.registered_ptr = self.registered_ptr, None
        res = torch.cuda.cudart().cudaHostUnregister(ptr)
        try:
            torch.cuda.check_error(res)
        except torch.cuda.CudaError as e:
            log.warning("cudaHostUnregister of the mapping of %s failed: %s", self.path, e)

    def close(self) -> None:
        self.unregister()
        self.tensor = None
        self.array = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                # A view escaped: the mapping goes when its last view does.
                log.warning("mapping of %s still has views; it is unmapped when they are freed", self.path)
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
