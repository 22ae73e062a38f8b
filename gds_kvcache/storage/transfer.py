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


def runs(objs: Sequence[MemoryObj], offsets: Sequence[int], stripe_bytes: int) -> tuple[list[Span], list[int]]:
    """Spans covering ``objs`` at pool ``offsets``, merged where slab and file are both contiguous.

    Returns the spans and, for each object, the index of its span.
    """
    order = sorted(range(len(objs)), key=lambda i: offsets[i])
    spans: list[Span] = []
    which = [0] * len(objs)
    cur_mem = cur_file = cur_n = -1
    for i in order:
        o, off = objs[i], offsets[i]
        if (cur_n > 0 and o.offset == cur_mem + cur_n and off == cur_file + cur_n
                and off // stripe_bytes == cur_file // stripe_bytes):
            cur_n += o.phys_size
        else:
            if cur_n > 0:
                spans.append(Span(cur_mem, cur_file, cur_n))
            cur_mem, cur_file, cur_n = o.offset, off, o.phys_size
        which[i] = len(spans)
    if cur_n > 0:
        spans.append(Span(cur_mem, cur_file, cur_n))
    return spans, which


class DiskTransfer:
    """Moves batches of slab objects to and from pool extents.

    Parameters
    ----------
    engine
        The I/O engine over the pool's stripe files (already attached to the slab).
    stripe_bytes
        Size of one stripe file; no span crosses one.
    """

    def __init__(self, engine: IOEngine, stripe_bytes: int):
        self.engine = engine
        self.stripe_bytes = stripe_bytes
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
        spans, which = runs(objs, offsets, self.stripe_bytes)
        self.stats["write_calls" if write else "read_calls"] += 1
        self.stats["spans"] += len(spans)
        errs = (self.engine.write_spans if write else self.engine.read_spans)(spans)
        return [errs[w] for w in which]
