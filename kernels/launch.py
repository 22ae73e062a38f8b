"""Launch a compiled Numba CUDA kernel from raw device addresses.

Numba's dispatcher, on every call, types each argument, wraps each CUDA
array interface object in a ``DeviceNDArray`` and flattens it; for a pack
of a few hundred MiB that costs about as long as the kernel runs (0.5 ms
measured on an H200, where the kernel needs 0.3). ``PreparedKernel``
compiles one overload up front and then flattens arguments itself, in the
same form Numba's own launcher hands to ``cuda.core.launch``: an array
argument is ``(meminfo, parent, nitems, itemsize, data, shape, strides)``.

Notes
-----
The fast path needs numba-cuda's launcher to be ``cuda.core.launch`` (numba-
cuda 0.2x and later). With any other Numba, ``PreparedKernel`` falls back to
the compiled kernel's own ``launch`` with device arrays; results are the
same, only slower. ``path`` says which one runs.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

__all__ = ["DeviceSpan", "PreparedKernel", "prepared", "prepared_launch_available"]

log = logging.getLogger(__name__)


class DeviceSpan:
    """A raw 1-D device range ``(ptr, n)`` of ``dtype``, seen through the CUDA array interface."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, n: int, dtype):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": np.dtype(dtype).str, "data": (ptr, False),
                                         "strides": None, "version": 3, "stream": None}


def _core_launch():
    """``(launch, LaunchConfig)`` when Numba itself launches through cuda.core, else None."""
    try:
        from cuda.core import LaunchConfig, launch
        from numba.cuda import dispatcher
    except ImportError:
        return None
    if getattr(dispatcher, "launch", None) is not launch:
        return None
    return launch, LaunchConfig


def prepared_launch_available() -> bool:
    """Whether GPU kernels can take the prepared (fast) launch path with this Numba."""
    return _core_launch() is not None


class PreparedKernel:
    """One overload of ``dispatcher`` for the types of ``example`` (DeviceSpans, ints, bools).

    Parameters
    ----------
    dispatcher
        A ``@cuda.jit`` kernel.
    example
        Arguments of the types later calls pass; compiled once here.
    """

    def __init__(self, dispatcher, example):
        argtypes = tuple(dispatcher.typeof_pyval(a) for a in example)
        self.kernel = dispatcher.compile(argtypes)
        self._types = argtypes
        self._kinds = []
        for ty in argtypes:
            if hasattr(ty, "ndim") and hasattr(ty, "dtype"):
                if ty.ndim != 1:
                    raise TypeError(f"PreparedKernel takes 1-D arrays only, got {ty}")
                self._kinds.append(("a", np.dtype(str(ty.dtype)).itemsize))
            elif str(ty) in ("bool", "boolean"):
                self._kinds.append(("b", None))
            else:
                self._kinds.append(("i", getattr(ctypes, f"c_{ty}")))
        core = _core_launch()
        self._configs: dict = {}
        self._streams: dict = {}
        if core is not None:
            try:
                self._cu = self.kernel._codelibrary.get_cufunc().kernel
                self._launch, self._LaunchConfig = core
                self.path = "prepared"
            except AttributeError:
                core = None
        if core is None:
            self.path = "numba-launch"
            log.info("numba-cuda does not launch through cuda.core; %s uses Numba's per-call launch",
                     getattr(dispatcher, "__name__", dispatcher))

    def _stream(self, handle: int):
        """The stream object the launcher takes: cuda.core's own where Numba launches through
        cuda.core (which deprecates foreign stream objects), else a Numba external stream."""
        s = self._streams.get(handle)
        if s is None:
            if len(self._streams) > 64:
                self._streams.clear()
            if _core_launch() is not None:
                import cuda.core as core

                if handle == 0 and hasattr(core, "LEGACY_DEFAULT_STREAM"):
                    s = core.LEGACY_DEFAULT_STREAM
                else:
                    s = core.Stream.from_handle(handle)
            else:
                from numba import cuda

                s = cuda.external_stream(handle)
            self._streams[handle] = s
        return s

    def __call__(self, grid, block, stream_handle: int, args) -> None:
        """Launch on the raw stream ``stream_handle``; arrays in ``args`` are ``(ptr, n)`` pairs."""
        stream = self._stream(stream_handle)
        if self.path != "prepared":
            from numba import cuda

            dev = [cuda.as_cuda_array(DeviceSpan(a[0], a[1], str(t.dtype))) if k == "a" else a
                   for (k, _), t, a in zip(self._kinds, self._types, args)]
            self.kernel.launch(dev, grid, block, stream, 0)
            return
        flat = []
        for (kind, aux), a in zip(self._kinds, args):
            if kind == "a":
                flat += (0, 0, a[1], aux, a[0], a[1], aux)
            elif kind == "i":
                flat.append(aux(a))
            else:
                flat.append(bool(a))
        key = (grid, block)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = self._LaunchConfig(grid=grid, block=block, shmem_size=0)
        self._launch(stream, cfg, self._cu, *flat)


_PREPARED: dict = {}
_PREPARED_LOCK = threading.Lock()


def prepared(dispatcher, device, example, tag=None) -> PreparedKernel:
    """The ``PreparedKernel`` of ``dispatcher`` on the torch ``device``, made once per ``tag``.

    ``example()`` returns the arguments whose types it is compiled for; it is
    called only the first time (the lookup runs on every launch). Each GPU gets
    its own: a compiled kernel is loaded into one device's context.
    """
    key = (dispatcher, tag, device.index)
    k = _PREPARED.get(key)
    if k is None:
        import torch

        with _PREPARED_LOCK:
            k = _PREPARED.get(key)
            if k is None:
                with torch.cuda.device(device):
                    k = _PREPARED[key] = PreparedKernel(dispatcher, example())
    return k
