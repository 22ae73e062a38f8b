"""CUDA staging lanes: a stream, an event per slot and async copies, through the CUDA driver API.

Thin on purpose: ``staging`` decides what to copy when; a lane only starts
copies between the slab and its pinned slots and says when they are done.

Calls that return at once (starting a copy into pinned memory, recording or
querying an event, making a stream wait) keep the GIL: with 16 I/O threads,
handing the GIL back and forth around each microsecond call costs more than
the call. Only the waits (``cuEventSynchronize``, ``cuStreamSynchronize``)
release it. The lane's stream never waits for the legacy default stream
(``CU_STREAM_NON_BLOCKING``) unless ``begin`` is told to order the batch
after it: ``staging.run_lane`` does so for puts, not for gets (the rule is
in ``staging``'s docstring).

Invariants
----------
* Every call of a batch (``begin``, the copies, ``ready``, ``wait``,
  ``end``) runs on the thread of its ``begin``, with the lane's primary
  context pushed there (``cuCtxPushCurrent`` is per thread).
* A slot's event is recorded right after the copy into or out of it, on
  the same stream: the event completes only once the copy has.
* ``end`` synchronises the stream: no copy outlives the batch, even one a
  failed pipeline never waited for.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Optional

from ..errors import IOEngineError
from ..memory.buffers import BounceBuffers, cuda_driver
from .lane_pool import LanePool
from .staging import Lane

__all__ = ["CudaLane", "cuda_lane_pool"]

_P, _U64, _SZ, _UI, _I = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int
_STREAM_NON_BLOCKING = 1
_EVENT_BLOCKING_SYNC, _EVENT_DISABLE_TIMING = 1, 2
_NOT_READY = 600
_LEGACY_STREAM = _P(1)  # CU_STREAM_LEGACY


class _Api:
    """The driver entry points a lane calls, bound once with their argument types."""

    _inst: Optional["_Api"] = None
    _lock = threading.Lock()

    def __init__(self, name: str):
        held, free = ctypes.PyDLL(name), ctypes.CDLL(name)  # own instances: argtypes set here stay here

        def bind(lib, fn, *argtypes):
            f = getattr(lib, fn)
            f.argtypes, f.restype = list(argtypes), ctypes.c_int
            return f

        self.dtoh = bind(held, "cuMemcpyDtoHAsync_v2", _P, _U64, _SZ, _P)
        self.htod = bind(held, "cuMemcpyHtoDAsync_v2", _U64, _P, _SZ, _P)
        self.record = bind(held, "cuEventRecord", _P, _P)
        self.query = bind(held, "cuEventQuery", _P)
        self.stream_wait = bind(held, "cuStreamWaitEvent", _P, _P, _UI)
        self.push = bind(held, "cuCtxPushCurrent_v2", _P)
        self.pop = bind(held, "cuCtxPopCurrent_v2", ctypes.POINTER(_P))
        self.event_sync = bind(free, "cuEventSynchronize", _P)
        self.stream_sync = bind(free, "cuStreamSynchronize", _P)
        self.stream_create = bind(free, "cuStreamCreate", ctypes.POINTER(_P), _UI)
        self.stream_destroy = bind(free, "cuStreamDestroy_v2", _P)
        self.event_create = bind(free, "cuEventCreate", ctypes.POINTER(_P), _UI)
        self.event_destroy = bind(free, "cuEventDestroy_v2", _P)
        self.device_get = bind(free, "cuDeviceGet", ctypes.POINTER(_I), _I)
        self.ctx_retain = bind(free, "cuDevicePrimaryCtxRetain", ctypes.POINTER(_P), _I)
        self.ctx_release = bind(free, "cuDevicePrimaryCtxRelease_v2", _I)
        self._err = free.cuGetErrorString

    @classmethod
    def get(cls) -> "_Api":
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls(cuda_driver()._name)  # cuda_driver() runs cuInit first
            return cls._inst

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self._err(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "unknown error"
            raise IOEngineError(f"{what}: CUDA error {rc} ({text})")


class CudaLane(Lane):
    """``depth`` pinned slots of a shared ``BounceBuffers``, a non-blocking stream and one event per slot.

    Parameters
    ----------
    bufs, first, depth
        The lane's slots are ``bufs`` slots ``first .. first + depth - 1``.
    device
        The CUDA device of the slabs this lane copies to and from.
    """

    def __init__(self, bufs: BounceBuffers, first: int, depth: int, device: int):
        api = self._api = _Api.get()
        self.depth = depth
        self.views = bufs.views[first:first + depth]
        self._addr = [bufs.addr(first + k) for k in range(depth)]
        self._ctx, dev = _P(), _I()
        api.check(api.device_get(ctypes.byref(dev), device), f"cuDeviceGet({device})")
        api.check(api.ctx_retain(ctypes.byref(self._ctx), dev.value), "cuDevicePrimaryCtxRetain")
        self._dev = dev.value  # the CUdevice whose primary context is retained, released in close()
        self._stream, self._events, self._order = _P(), [], _P()
        try:
            self._push()
            try:
                api.check(api.stream_create(ctypes.byref(self._stream), _STREAM_NON_BLOCKING), "cuStreamCreate")
                for _ in range(depth + 1):
                    ev = _P()
                    api.check(api.event_create(ctypes.byref(ev), _EVENT_BLOCKING_SYNC | _EVENT_DISABLE_TIMING),
                              "cuEventCreate")
                    self._events.append(ev)
            finally:
                self._pop()
        except BaseException:
            self.close()
            raise
        self._order = self._events.pop()
        self._slab = 0

    def _push(self) -> None:
        self._api.check(self._api.push(self._ctx), "cuCtxPushCurrent")

    def _pop(self) -> None:
        self._api.pop(ctypes.byref(_P()))

    def begin(self, buffer, after_default_stream: bool) -> None:
        self._push()
        try:
            self._slab = buffer.tensor.data_ptr()
            if after_default_stream:  # one event a batch: the copies start after the default stream's work
                api = self._api
                api.check(api.record(self._order, _LEGACY_STREAM), "cuEventRecord on the default stream")
                api.check(api.stream_wait(self._stream, self._order, 0), "cuStreamWaitEvent")
        except BaseException:
            self._pop()
            raise

    def end(self) -> None:
        try:
            self._api.check(self._api.stream_sync(self._stream), "cuStreamSynchronize")
        finally:
            self._pop()

    def to_host(self, slot: int, mem_offset: int, nbytes: int) -> None:
        api = self._api
        api.check(api.dtoh(self._addr[slot], self._slab + mem_offset, nbytes, self._stream), "cuMemcpyDtoHAsync")
        api.check(api.record(self._events[slot], self._stream), "cuEventRecord")

    def to_device(self, slot: int, mem_offset: int, nbytes: int) -> None:
        api = self._api
        api.check(api.htod(self._slab + mem_offset, self._addr[slot], nbytes, self._stream), "cuMemcpyHtoDAsync")
        api.check(api.record(self._events[slot], self._stream), "cuEventRecord")

    def ready(self, slot: int) -> bool:
        rc = self._api.query(self._events[slot])
        if rc == _NOT_READY:
            return False
        self._api.check(rc, "cuEventQuery")
        return True

    def wait(self, slot: int) -> None:
        ev = self._events[slot]
        rc = self._api.query(ev)
        if rc == _NOT_READY:
            rc = self._api.event_sync(ev)  # the GIL is released while the copy finishes
        self._api.check(rc, "GPU staging copy")

    def close(self) -> None:
        api = self._api
        if not self._ctx:
            return
        if api.push(self._ctx) == 0:
            try:
                for ev in self._events + ([self._order] if self._order else []):
                    api.event_destroy(ev)
                if self._stream:
                    api.stream_destroy(self._stream)
            finally:
                self._pop()
        self._events, self._order, self._stream = [], _P(), _P()
        api.ctx_release(self._dev)
        self._ctx = _P()


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def cuda_lane_pool(buffer, lanes: int, depth: int, slot_bytes: int) -> Optional[LanePool]:
    """``lanes`` CUDA lanes of ``depth`` slots for ``buffer``'s device, every slot in one pinned allocation.

    None for a slab that is not in GPU memory (host and pinned slabs need no
    staging). Engines asking for the same shape on the same device share one
    pool (each engine's ``close`` drops its share): a process reading many
    writers' pools in shared mode pins the bounce buffers once, not once per
    engine.
    """
    if buffer.kind != "cuda":
        return None
    key = (buffer.cuda_device, lanes, depth, slot_bytes)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.share():
            return pool
        pool = _make_pool(buffer.cuda_device, lanes, depth, slot_bytes, key)
        _POOLS[key] = pool
        return pool


def _forget(key, pool: LanePool) -> None:
    with _POOLS_LOCK:
        if _POOLS.get(key) is pool:
            del _POOLS[key]


def _make_pool(device: int, lanes: int, depth: int, slot_bytes: int, key) -> LanePool:
    bufs = BounceBuffers(lanes * depth, slot_bytes, "pinned", device)
    made: list[CudaLane] = []
    try:
        for k in range(lanes):
            made.append(CudaLane(bufs, k * depth, depth, device))
    except BaseException:
        for lane in made:
            lane.close()
        bufs.close()
        raise
    what = (f"{lanes} lane(s) x {depth} pinned slots x {bufs.size >> 10} KiB "
            f"({bufs.nbytes / (1 << 20):.0f} MiB pinned once, shared by the process's engines)")
    return LanePool(made, owned=[bufs], describe=what, device=device, on_close=lambda p: _forget(key, p))
