"""One big 4 KiB-aligned buffer per slab, in CUDA, pinned host or plain host memory."""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Optional

import numpy as np
import torch

from ..errors import ClosedError, ConfigError, IOEngineError
from ..units import PAGE

__all__ = ["BounceBuffers", "SlabBuffer", "as_io_buffer", "cuda_driver", "resolve_memory_device"]

log = logging.getLogger(__name__)


def resolve_memory_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "host"
    if kind in ("cuda", "pinned") and not torch.cuda.is_available():
        raise ConfigError("memory_device", kind, "'host' or 'auto' on a machine without a usable CUDA GPU")
    return kind


def as_io_buffer(t: torch.Tensor):
    """What an I/O engine can read into or write from: the tensor on GPU, a NumPy view on host."""
    if t.is_cuda:
        return t
    return t.view(torch.uint8).numpy()


class _Driver:
    """The few CUDA driver calls a private device allocation needs, through ``libcuda.so.1``."""

    _lib = None
    _lock = threading.Lock()

    @classmethod
    def lib(cls):
        with cls._lock:
            if cls._lib is None:
                lib = ctypes.CDLL("libcuda.so.1")
                cls._check(lib, lib.cuInit(0), "cuInit")
                cls._lib = lib
        return cls._lib

    @staticmethod
    def _check(lib, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            lib.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "unknown error"
            if rc == 2:  # CUDA_ERROR_OUT_OF_MEMORY
                raise ConfigError("slab_size", what, f"a size the GPU can hold ({text})")
            raise ConfigError("memory_device", "cuda", f"a device where {what} works (CUDA error {rc}: {text})")

    @classmethod
    def check(cls, rc: int, what: str) -> None:
        cls._check(cls.lib(), rc, what)


def cuda_driver():
    """``libcuda.so.1`` as a ``ctypes.CDLL``, ``cuInit`` done (``ConfigError`` where it cannot load or init)."""
    return _Driver.lib()


class _DeviceMemory:
    """``cuMemAlloc``'d bytes on one device: a slab's own allocation, outside PyTorch's caching allocator.

    Registering a caching-allocator block with cuFile goes wrong when the block
    is handed out again (``already registered``) or shared by two slabs (each
    deregisters the other); memory of its own has neither problem, and
    ``free()`` gives it back to the driver at once.
    """

    __slots__ = ("ptr", "nbytes", "device", "_dev", "__weakref__")

    def __init__(self, nbytes: int, device: int):
        lib = _Driver.lib()
        self.nbytes, self.device, self.ptr = nbytes, device, 0
        dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
        _Driver.check(lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
        # The primary context is the one PyTorch and KvikIO use: the memory is theirs to touch.
        _Driver.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._dev = dev.value
        try:
            _Driver.check(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
            try:
                _Driver.check(lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)),
                              f"cuMemAlloc of {nbytes} bytes on cuda:{device}")
            finally:
                lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        except BaseException:
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            raise
        self.ptr = ptr.value

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 2}

    def free(self) -> None:
        """Give the memory back to the driver now; idempotent."""
        ptr, self.ptr = self.ptr, 0
        if not ptr:
            return
        lib = _Driver.lib()
        ctx = ctypes.c_void_p()
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._dev)
        lib.cuCtxPushCurrent_v2(ctx)
        try:
            # cuMemFree waits for work on the memory to finish, so no copy is cut short.
            rc = lib.cuMemFree_v2(ctypes.c_uint64(ptr))
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)  # the retain of __init__
        if rc != 0:
            log.warning("cuMemFree of a %d-byte slab on cuda:%d failed (CUDA error %d)", self.nbytes, self.device, rc)

    def __del__(self):
        # Only for a slab nobody closed: the last tensor view is gone, so freeing is safe.
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn ctypes down
            pass


class SlabBuffer:
    """A contiguous ``uint8`` tensor of ``nbytes`` whose first byte is 4 KiB-aligned.

    Parameters
    ----------
    nbytes
        Usable bytes (rounded up to 4 KiB).
    kind
        ``cuda``, ``pinned`` or ``host``.
    cuda_device
        Device index for ``cuda``.

    Notes
    -----
    GDS DMAs only between 4 KiB-aligned GPU addresses and file offsets, and
    O_DIRECT needs aligned host buffers, so the raw allocation is one page
    larger and the view starts at the first aligned address in it.

    A ``cuda`` slab is its own ``cuMemAlloc`` allocation, not a block of
    PyTorch's caching allocator, so it can be registered with cuFile without
    colliding with other tensors, and ``close()`` returns it to the driver at
    once (``torch.cuda.memory_allocated`` does not count it; use
    ``torch.cuda.mem_get_info``). Close the I/O engine first, then the slab:
    any tensor view taken from ``tensor`` is dangling after ``close()``.
    """

    def __init__(self, nbytes: int, kind: str, cuda_device: int = 0):
        if kind not in ("cuda", "pinned", "host"):
            raise ConfigError("memory_device", kind, "cuda | pinned | host")
        self.kind = kind
        self.cuda_device = cuda_device
        self.nbytes = (nbytes + PAGE - 1) // PAGE * PAGE
        self._mem = None
        if kind == "cuda":
            self._mem = _DeviceMemory(self.nbytes + PAGE, cuda_device)
            try:
                raw = torch.as_tensor(self._mem, device=torch.device("cuda", cuda_device))
            except BaseException:
                self._mem.free()
                raise
            assert raw.data_ptr() == self._mem.ptr, "torch copied the slab instead of wrapping it"
        elif kind == "pinned":
            raw = torch.empty(self.nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
        else:
            # Touch every page now: first-touch faults on the read path cost
            # more than the copy itself and stall all I/O threads on mm locks.
            raw = torch.zeros(self.nbytes + PAGE, dtype=torch.uint8)
        skew = (-raw.data_ptr()) % PAGE
        self._raw = raw
        self._tensor = raw[skew:skew + self.nbytes]
        assert self._tensor.data_ptr() % PAGE == 0
        self.registered = False
        self.registration = "not registered"
        self._host_array = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def tensor(self) -> torch.Tensor:
        """The slab's bytes; ``ClosedError`` after ``close()``."""
        t = self._tensor
        if t is None:
            raise ClosedError("the slab buffer is closed")
        return t

    @property
    def closed(self) -> bool:
        return self._closed

    def host_array(self):
        """The buffer as a NumPy ``uint8`` array (host kinds only), made once."""
        if self._host_array is None:
            assert self.kind != "cuda", "no NumPy view of GPU memory"
            self._host_array = self.tensor.numpy()
        return self._host_array

    @property
    def device(self) -> torch.device:
        if self.kind == "cuda":
            return torch.device("cuda", self.cuda_device)
        return torch.device("cpu")

    def register_gds(self) -> bool:
        """Register the whole allocation with cuFile, in the slab's own device context.

        Returns whether the slab is registered. A refusal (cuFile's pinned-memory
        limit ``max_device_pinned_mem_size_kb``, a small BAR1, no cuFile) is
        logged as a warning and recorded in ``registration``; the slab then
        works unregistered (cuFile bounces through its own GPU buffers).

        Notes
        -----
        Only the KvikIO engine calls this, and only where GDS will run. Calling
        it again is a no-op; ``deregister_gds`` undoes it exactly once.
        """
        with self._lock:
            if self._closed:
                raise ClosedError("the slab buffer is closed")
            if self.registered:
                return True
            if self.kind != "cuda":
                self.registration = "host memory: nothing to register"
                return False
            try:
                import kvikio

                # cuFile pins BAR1 of the *current* device: make it the slab's.
                with torch.cuda.device(self.cuda_device):
                    kvikio.memory_register(self._mem)
            except Exception as e:  # noqa: BLE001 - any refusal leaves a working, unregistered slab
                self.registration = f"cuFile refused: {type(e).__name__}: {e}"
                log.warning("cuFile refused to register the %d-byte slab on cuda:%d (%s); running unregistered, "
                            "cuFile bounces through its own buffers", self.nbytes, self.cuda_device, e)
                return False
            self.registered = True
            self.registration = "registered"
            log.info("registered %d-byte CUDA slab on cuda:%d with cuFile", self.nbytes, self.cuda_device)
            return True

    def deregister_gds(self) -> None:
        """Undo ``register_gds``; a no-op when not registered."""
        with self._lock:
            if not self.registered:
                return
            self.registered = False
            self.registration = "deregistered"
            try:
                import kvikio

                with torch.cuda.device(self.cuda_device):
                    kvikio.memory_deregister(self._mem)
            except Exception as e:  # noqa: BLE001 - the memory is freed next either way
                log.warning("cuFile deregistration of the slab on cuda:%d failed: %s", self.cuda_device, e)

    def close(self) -> None:
        """Release the memory now (GPU memory goes back to the driver); idempotent.

        Notes
        -----
        Every reference the buffer holds is dropped, so a host slab is freed as
        soon as no caller holds a view; a CUDA slab is freed at once regardless.
        A slab still registered (its engine not closed) is deregistered first.
        """
        if self._closed:
            return
        if self.registered:
            log.warning("closing a slab still registered with cuFile: close the I/O engine before the slab")
            self.deregister_gds()
        with self._lock:
            self._closed = True
            mem, self._mem = self._mem, None
            self._tensor = self._raw = self._host_array = None
        if mem is not None:
            mem.free()


class _PinnedHostMemory:
    """``cuMemHostAlloc``'d bytes: page-locked, exactly ``nbytes``, outside PyTorch's caching host allocator
    (which rounds up to a power of two and never gives memory back). The driver promises 256-byte
    alignment only: ``ptr`` need not be page-aligned (``BounceBuffers`` rounds up inside)."""

    __slots__ = ("ptr", "nbytes", "_dev")

    def __init__(self, nbytes: int, device: int):
        lib = _Driver.lib()
        self.nbytes, self.ptr = nbytes, 0
        dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
        _Driver.check(lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
        _Driver.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._dev = dev.value
        try:
            _Driver.check(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
            try:
                # PORTABLE: pinned for every context, whichever device's lanes copy through it.
                _Driver.check(lib.cuMemHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(1)),
                              f"cuMemHostAlloc of {nbytes} bytes")
            finally:
                lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        except BaseException:
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            raise
        self.ptr = ptr.value

    def free(self) -> None:
        """Unpin and free now; idempotent."""
        ptr, self.ptr = self.ptr, 0
        if not ptr:
            return
        lib = _Driver.lib()
        ctx = ctypes.c_void_p()
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._dev)
        lib.cuCtxPushCurrent_v2(ctx)
        try:
            rc = lib.cuMemFreeHost(ctypes.c_void_p(ptr))
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)  # the retain of __init__
        if rc != 0:
            log.warning("cuMemFreeHost of %d pinned bytes failed (CUDA error %d)", self.nbytes, rc)


class BounceBuffers:
    """``count`` staging slots of ``size`` bytes each (4 KiB-aligned), carved from one allocation.

    Parameters
    ----------
    count, size
        Slots and bytes per slot (rounded up to 4 KiB).
    kind
        ``pinned`` (page-locked, what asynchronous CUDA copies need) or
        ``host`` (plain memory, for staging without a GPU).
    cuda_device
        The device whose context allocates ``pinned`` memory (usable from
        every device).

    Notes
    -----
    One allocation for every slot, made up front: pinning costs milliseconds
    per call, and paid on a transfer's path (two buffers per thread on first
    use) it cost more than the transfer itself. ``views[i]`` and ``addr(i)``
    are slot ``i``'s bytes and address. ``close()`` frees pinned memory at
    once: nothing may copy into or out of a slot after it.

    Every slot starts on a page (O_DIRECT refuses anything else): the pinned
    allocation is one page larger than the slots and they start at its first
    page boundary, since ``cuMemHostAlloc`` aligns to 256 bytes only; the
    allocation is freed at the address the driver gave.
    """

    def __init__(self, count: int, size: int, kind: str, cuda_device: int = 0):
        assert count >= 1 and kind in ("pinned", "host"), (count, kind)
        self.count = count
        self.size = (size + PAGE - 1) // PAGE * PAGE
        self.kind = kind
        nbytes = count * self.size
        self._pinned: Optional[_PinnedHostMemory] = None
        self._slab: Optional[SlabBuffer] = None
        if kind == "pinned":
            self._pinned = _PinnedHostMemory(nbytes + PAGE, cuda_device)
            self.base = self._pinned.ptr + (-self._pinned.ptr) % PAGE
            arr = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(self.base), dtype=np.uint8)
        else:
            self._slab = SlabBuffer(nbytes, "host")  # page-aligned itself
            arr = self._slab.host_array()
            self.base = self._slab.tensor.data_ptr()
        if self.base % PAGE:
            self.close()
            raise IOEngineError(f"staging slots at {self.base:#x} are not {PAGE}-byte aligned: O_DIRECT would "
                                f"refuse them")
        self.views = [memoryview(arr[i * self.size:(i + 1) * self.size]) for i in range(count)]

    @property
    def nbytes(self) -> int:
        return self.count * self.size

    def addr(self, i: int) -> int:
        """The address of slot ``i``'s first byte."""
        return self.base + i * self.size

    def close(self) -> None:
        """Free the slots (idempotent); every copy into or out of them must be over."""
        self.views = []
        if self._pinned is not None:
            self._pinned.free()
        if self._slab is not None:
            self._slab.close()
