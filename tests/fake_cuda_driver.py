"""A fake CUDA driver at the level of ``gds_kvcache.io.cuda_lane._Api``, so ``CudaLane`` runs on the CPU.

"Device" addresses are host addresses (the tests' slabs are host memory).
Each stream is an in-order queue of operations that run only when something
needs them to:

* ``cuEventSynchronize`` runs the event's stream up to its last record,
  ``cuStreamSynchronize`` runs the whole stream, ``cuEventQuery`` says
  ``CUDA_ERROR_NOT_READY`` until the record ran (with ``progress`` > 0 it
  first runs the stream that far with that probability);
* ``cuStreamWaitEvent`` queues a wait that, when reached, first runs the
  other stream up to the record (cross-stream order, e.g. after the legacy
  default stream, where ``launch`` queues work of the tests' own).

Copies are strict where a DMA engine is free: a device-to-host copy poisons
its host bytes at issue and fills them when it runs, so a slot read before
its copy completed shows poison; a host-to-device copy takes its source at
issue and records a violation if the source changes before it ran. So a
lane that records a slot's event before its copy, or returns from ``end``
without synchronising its stream, moves wrong bytes or leaves work behind.

The current context is per thread, as in CUDA: every stream, event and copy
call needs one pushed on the calling thread, else it records a violation
and returns ``CUDA_ERROR_INVALID_CONTEXT``. Copies outside the registered
host ``regions`` are violations too.
"""

from __future__ import annotations

import ctypes
import random
import threading
from collections import deque

from gds_kvcache.errors import IOEngineError

NOT_READY = 600
INVALID_CONTEXT = 201
INVALID_HANDLE = 400
LEGACY = 1  # CU_STREAM_LEGACY
POISON = 0xEE


def _h(x) -> int:
    """A handle's value, from a ``c_void_p`` or an int."""
    v = x.value if isinstance(x, ctypes.c_void_p) else x
    return v or 0


def _set(ref, value) -> None:
    ref._obj.value = value  # a ctypes.byref(...) argument


class FakeDriver:
    """Stands in for ``_Api`` (see the module docstring)."""

    def __init__(self, seed: int = 0, progress: float = 0.0):
        self._lock = threading.RLock()
        self._rnd = random.Random(seed)
        self.progress = progress
        self._next = 0x100
        self.streams = {LEGACY: deque()}
        self.events = {}  # handle -> [stream, recorded token, token done]
        self.ctx_depth = {}  # thread ident -> contexts pushed
        self._tls = threading.local()
        self.retained = self.released = 0
        self.regions = []  # (address, bytes) copies may touch
        self.violations = []
        self.copies = 0
        self.fail_issue = set()  # copy numbers whose issue returns an error
        self.fail_event = set()  # copy numbers whose event synchronise returns an error
        self._fail_at = {}  # event handle -> token whose synchronise fails
        self.log = []  # (op, ...) in call order

    # -- helpers ------------------------------------------------------------------------
    def add_region(self, addr: int, nbytes: int) -> None:
        self.regions.append((addr, nbytes))

    def _new(self) -> int:
        self._next += 1
        return self._next

    def _ctx_ok(self, what: str) -> bool:
        if getattr(self._tls, "stack", None):
            return True
        self.violations.append(f"{what} without a current context on this thread")
        return False

    def _in_regions(self, addr: int, n: int, what: str) -> None:
        if not any(a <= addr and addr + n <= a + size for a, size in self.regions):
            self.violations.append(f"{what} of {n} bytes at {addr:#x} outside every registered region")

    def pending(self, stream=None) -> int:
        """Operations queued and not run (on ``stream``, or on every stream)."""
        with self._lock:
            if stream is not None:
                return len(self.streams.get(_h(stream), ()))
            return sum(len(q) for q in self.streams.values())

    def launch(self, stream, fn) -> None:
        """Queue ``fn()`` on ``stream`` (a kernel of the test's)."""
        with self._lock:
            self.streams[_h(stream)].append(("fn", fn))

    def _run_one(self, stream: int) -> None:
        op = self.streams[stream].popleft()
        kind = op[0]
        if kind == "copy":
            _, dst, src, n, snap = op
            if snap is not None:
                now = ctypes.string_at(src, n)
                if now != snap:
                    self.violations.append(f"source at {src:#x} changed while its host-to-device copy was queued")
                ctypes.memmove(dst, snap, n)
            else:
                ctypes.memmove(dst, src, n)
        elif kind == "record":
            ev = self.events[op[1]]
            ev[2] = max(ev[2], op[2])
        elif kind == "wait":
            self._complete(op[1], op[2])
        else:
            op[1]()

    def _run(self, stream: int, until=None) -> None:
        """Run ``stream`` until ``until()`` holds, or to its end."""
        q = self.streams[stream]
        while q and (until is None or not until()):
            self._run_one(stream)

    def _complete(self, handle: int, token: int) -> None:
        ev = self.events[handle]
        if ev[0] is not None:
            self._run(ev[0], lambda: ev[2] >= token)

    # -- context --------------------------------------------------------------------------
    def device_get(self, ref, ordinal):
        _set(ref, ordinal)
        return 0

    def ctx_retain(self, ref, dev):
        with self._lock:
            self.retained += 1
        _set(ref, 0xC0 + dev)
        return 0

    def ctx_release(self, dev):
        with self._lock:
            self.released += 1
        return 0

    def push(self, ctx):
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        stack.append(_h(ctx))
        with self._lock:
            t = threading.get_ident()
            self.ctx_depth[t] = self.ctx_depth.get(t, 0) + 1
        return 0

    def pop(self, ref):
        stack = getattr(self._tls, "stack", None)
        if not stack:
            self.violations.append("cuCtxPopCurrent with no context pushed on this thread")
            return INVALID_CONTEXT
        _set(ref, stack.pop())
        with self._lock:
            self.ctx_depth[threading.get_ident()] -= 1
        return 0

    # -- streams and events ----------------------------------------------------------
    def stream_create(self, ref, flags):
        if not self._ctx_ok("cuStreamCreate"):
            return INVALID_CONTEXT
        with self._lock:
            s = self._new()
            self.streams[s] = deque()
        _set(ref, s)
        return 0

    def stream_destroy(self, stream):
        if not self._ctx_ok("cuStreamDestroy"):
            return INVALID_CONTEXT
        with self._lock:
            q = self.streams.pop(_h(stream), None)
            if q is None:
                return INVALID_HANDLE
            if q:
                self.violations.append(f"stream destroyed with {len(q)} operation(s) queued")
        return 0

    def event_create(self, ref, flags):
        if not self._ctx_ok("cuEventCreate"):
            return INVALID_CONTEXT
        with self._lock:
            e = self._new()
            self.events[e] = [None, 0, 0]
        _set(ref, e)
        return 0

    def event_destroy(self, event):
        if not self._ctx_ok("cuEventDestroy"):
            return INVALID_CONTEXT
        with self._lock:
            return 0 if self.events.pop(_h(event), None) is not None else INVALID_HANDLE

    def record(self, event, stream):
        if not self._ctx_ok("cuEventRecord"):
            return INVALID_CONTEXT
        with self._lock:
            e, s = _h(event), _h(stream)
            ev = self.events[e]
            ev[0], ev[1] = s, ev[1] + 1
            self.streams[s].append(("record", e, ev[1]))
            if self._last_copy_failing is not None:
                self._fail_at[e] = ev[1]
                self._last_copy_failing = None
            self.log.append(("record", e, s))
        return 0

    _last_copy_failing = None

    def stream_wait(self, stream, event, flags):
        if not self._ctx_ok("cuStreamWaitEvent"):
            return INVALID_CONTEXT
        with self._lock:
            e = _h(event)
            self.streams[_h(stream)].append(("wait", e, self.events[e][1]))
            self.log.append(("stream_wait", _h(stream), e))
        return 0

    def query(self, event):
        if not self._ctx_ok("cuEventQuery"):
            return INVALID_CONTEXT
        with self._lock:
            e = _h(event)
            ev = self.events[e]
            if ev[2] < ev[1] and self._rnd.random() < self.progress:
                self._complete(e, ev[1])
            return 0 if ev[2] >= ev[1] else NOT_READY

    def event_sync(self, event):
        if not self._ctx_ok("cuEventSynchronize"):
            return INVALID_CONTEXT
        with self._lock:
            e = _h(event)
            ev = self.events[e]
            self._complete(e, ev[1])
            if self._fail_at.get(e) == ev[1]:
                del self._fail_at[e]
                return 700  # CUDA_ERROR_ILLEGAL_ADDRESS: the copy failed
            return 0

    def stream_sync(self, stream):
        if not self._ctx_ok("cuStreamSynchronize"):
            return INVALID_CONTEXT
        with self._lock:
            self._run(_h(stream))
            self.log.append(("stream_sync", _h(stream)))
        return 0

    # -- copies ---------------------------------------------------------------------------
    def _copy(self, what: str, dst: int, src: int, n: int, stream, to_device: bool) -> int:
        if not self._ctx_ok(what):
            return INVALID_CONTEXT
        with self._lock:
            k = self.copies
            self.copies += 1
            if k in self.fail_issue:
                return 1  # CUDA_ERROR_INVALID_VALUE
            if k in self.fail_event:
                self._last_copy_failing = k
            self._in_regions(dst, n, f"{what} destination")
            self._in_regions(src, n, f"{what} source")
            if to_device:
                snap = ctypes.string_at(src, n)  # the bytes a DMA may take at issue
            else:
                snap = None
                ctypes.memset(dst, POISON, n)  # the host bytes are the copy's until it completed
            self.streams[_h(stream)].append(("copy", dst, src, n, snap))
            self.log.append((what, dst, src, n, _h(stream)))
        return 0

    def dtoh(self, dst, src, n, stream):
        return self._copy("cuMemcpyDtoHAsync", dst, src, n, stream, False)

    def htod(self, dst, src, n, stream):
        return self._copy("cuMemcpyHtoDAsync", dst, src, n, stream, True)

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise IOEngineError(f"{what}: CUDA error {rc} (fake driver)")
