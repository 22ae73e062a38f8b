"""The I/O engine interface: a MemoryObj's bytes to and from one file, at an offset."""

from __future__ import annotations

import abc
import threading
from concurrent.futures import Future
from dataclasses import dataclass


from ..errors import IOEngineError
from ..memory.obj import MemoryObj

__all__ = ["IOEngine", "IOPathReport", "gather"]


@dataclass(frozen=True)
class IOPathReport:
    """Which path moves the bytes, so users can tell a GDS run from a fallback.

    ``path`` is ``gds`` (cuFile DMA), ``kvikio-compat`` (KvikIO's POSIX
    fallback with bounce buffers) or ``posix`` (this library's pread/pwrite).
    """

    engine: str
    path: str
    direct_io: bool
    direct_io_reason: str
    threads: int
    task_size: int
    memory: str
    files: int = 1

    def line(self) -> str:
        d = "O_DIRECT" if self.direct_io else f"buffered ({self.direct_io_reason})"
        return (f"engine={self.engine} path={self.path} io={d} threads={self.threads} "
                f"task={self.task_size >> 10} KiB files={self.files} memory={self.memory}")


def gather(futures: list[Future], expect: int, what: str) -> Future:
    """One future that completes with the total byte count once every part has."""
    out: Future = Future()
    if not futures:
        out.set_result(0)
        return out
    lock = threading.Lock()
    state = {"left": len(futures), "total": 0, "error": None}

    def done(f: Future) -> None:
        exc = f.exception()
        with lock:
            if exc is not None and state["error"] is None:
                state["error"] = exc
            elif exc is None:
                state["total"] += f.result()
            state["left"] -= 1
            last = state["left"] == 0
        if last:
            if state["error"] is not None:
                out.set_exception(state["error"])
            elif state["total"] != expect:
                out.set_exception(IOEngineError(f"{what}: moved {state['total']} of {expect} bytes"))
            else:
                out.set_result(state["total"])

    for f in futures:
        f.add_done_callback(done)
    return out


class IOEngine(abc.ABC):
    """Reads and writes ``MemoryObj`` bytes at byte offsets of one open file.

    The file is opened once when the engine is built and every operation
    reuses the handle. ``nbytes`` and ``file_offset`` should be 4 KiB
    multiples (the disk backend always passes ``phys_size``) so direct I/O
    and GDS can DMA without bounce buffers.
    """

    @abc.abstractmethod
    def _submit(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        """Start the transfer; the future gives the byte count."""

    @abc.abstractmethod
    def _blocking(self, write: bool, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        """The transfer, in the caller's thread as far as possible; the byte count."""

    def submit_read(self, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        """Start reading ``nbytes`` at ``file_offset`` into ``obj``; the future gives the count."""
        return self._submit(False, obj, file_offset, nbytes)

    def submit_write(self, obj: MemoryObj, file_offset: int, nbytes: int) -> Future:
        """Start writing ``nbytes`` of ``obj`` at ``file_offset``; the future gives the count."""
        return self._submit(True, obj, file_offset, nbytes)

    def read(self, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        """Read and return once the bytes are in ``obj`` (GPU copies included)."""
        return self._blocking(False, obj, file_offset, nbytes)

    def write(self, obj: MemoryObj, file_offset: int, nbytes: int) -> int:
        """Write and return once the bytes are in the file."""
        return self._blocking(True, obj, file_offset, nbytes)

    @abc.abstractmethod
    def report(self) -> IOPathReport:
        """What path this engine runs on."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish nothing new; close the file."""

    @staticmethod
    def _check(obj: MemoryObj, nbytes: int, file_offset: int, stripe: int) -> None:
        if nbytes > obj.phys_size or nbytes <= 0:
            raise IOEngineError(f"cannot move {nbytes} bytes through {obj!r}")
        if file_offset < 0 or file_offset // stripe != (file_offset + nbytes - 1) // stripe:
            raise IOEngineError(f"[{file_offset}, +{nbytes}) crosses a file boundary (stripe {stripe})")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

