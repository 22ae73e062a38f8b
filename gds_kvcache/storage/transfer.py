"""``DiskTransfer``: a batch of chunks between the slab and the pool in few large transfers.

The transfer side of the disk tier. Chunks that sit next to each other both
in the slab and in one pool file become one span, so a batch stored or read
together is one ``pwrite``/``pread`` per run (split over the engine's threads
by task size), and its checksums are one kernel launch.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from ..io import IOEngine
from ..io.base import Span
from ..kernels.checksum import checksum_batch
from ..memory.obj import MemoryObj

__all__ = ["DiskTransfer", "runs"]

log = logging.getLogger(__name__)


def runs(objs: Sequence[MemoryObj], offsets: Sequence[int], pool) -> tuple[list[Span], list[list[int]]]:
    """Spans covering ``objs`` at logical pool ``offsets``.

    Objects adjacent both in the slab and in the pool are merged into one run,
    and each run is cut where the pool's interleave moves to another file
    (``pool.pieces``). Returns the spans (``file_offset`` = file index times
    file size plus the offset in that file, as the engines take it) and, per
    object, the indexes of the spans that carry its bytes.
    """
    order = sorted(range(len(objs)), key=lambda i: offsets[i])
    merged: list[tuple[int, int, int, list[int]]] = []    # (mem, logical, nbytes, objects)
    for i in order:
        o, off = objs[i], offsets[i]
        if merged:
            mem, log_off, n, members = merged[-1]
            if o.offset == mem + n and off == log_off + n:
                merged[-1] = (mem, log_off, n + o.phys_size, members + [i])
                continue
        merged.append((o.offset, off, o.phys_size, [i]))
    spans: list[Span] = []
    which: list[list[int]] = [[] for _ in objs]
    for mem, log_off, n, members in merged:
        bounds = [(offsets[i] - log_off, offsets[i] - log_off + objs[i].phys_size, i) for i in members]
        for f, local, delta, size in pool.pieces(log_off, n):
            idx = len(spans)
            spans.append(Span(mem + delta, f * pool.stripe_bytes + local, size))
            for lo, hi, i in bounds:
                if lo < delta + size and delta < hi:
                    which[i].append(idx)
    return spans, which


class DiskTransfer:
    """Moves batches of slab objects to and from pool extents.

    Parameters
    ----------
    engine
        The I/O engine over the pool's files (already attached to the slab).
    pool
        The pool directory: its interleave maps logical offsets to files.
    """

    def __init__(self, engine: IOEngine, pool):
        self.engine = engine
        self.pool = pool
        self.stats = {"write_calls": 0, "read_calls": 0, "spans": 0, "checksum_calls": 0}

    def checksums(self, objs: Sequence[MemoryObj]) -> list[int]:
        """The checksum of each object's logical bytes, in one launch for the batch."""
        if not objs:
            return []
        self.stats["checksum_calls"] += 1
        buf = objs[0]._alloc.buffer.tensor
        # The bytes are complete: the producer was waited for (puts) or the engine synchronised (gets).
        return checksum_batch(buf, [(o.offset, o.nbytes) for o in objs], ordered=False)

    def write(self, objs: Sequence[MemoryObj], offsets: Sequence[int]) -> list[Optional[BaseException]]:
        """Write each object's ``phys_size`` bytes at its pool offset; per object, None or the error."""
        return self._move(True, objs, offsets)

    def read(self, objs: Sequence[MemoryObj], offsets: Sequence[int]) -> list[Optional[BaseException]]:
        """Read each object's ``phys_size`` bytes from its pool offset; per object, None or the error."""
        return self._move(False, objs, offsets)

    def _move(self, write: bool, objs, offsets) -> list[Optional[BaseException]]:
        if not objs:
            return []
        spans, which = runs(objs, offsets, self.pool)
        self.stats["write_calls" if write else "read_calls"] += 1
        self.stats["spans"] += len(spans)
        errs = (self.engine.write_spans if write else self.engine.read_spans)(spans)
        return [next((errs[w] for w in ws if errs[w] is not None), None) for ws in which]
