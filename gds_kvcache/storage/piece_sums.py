"""``PieceSums``: a batch's chunk checksums, hashed piece by piece by the I/O threads.

A host-slab transfer moves a batch as task-sized pieces on several threads.
Hashing each piece on the thread that moved it, right after its read (or just
before its write), overlaps the checksum with the other pieces' I/O instead of
running it over the whole batch once the I/O is done; the thread hashes bytes
that are in the slab and will not change (the read into them has returned;
a put's producer has finished), the same bytes a checksum after the transfer
would see.

Invariant: ``result`` gives ``checksum_host`` of each object's logical bytes,
bit for bit. Pieces add ``word_sum`` terms (``kernels.checksum_pieces``) and
count the bytes they covered; an object whose whole words were not covered
exactly once (a piece skipped after an error, a piece not 8-byte aligned) is
hashed in full by ``result`` instead, so a missing or repeated piece can never
yield a wrong checksum, only a slower one.
"""

from __future__ import annotations

import bisect
import threading
from typing import Optional, Sequence

import numpy as np

from ..kernels.checksum import checksum_batch
from ..memory.obj import MemoryObj

__all__ = ["PieceSums", "words_of"]

_MASK = (1 << 64) - 1


def _pieces():
    """``kernels.checksum_pieces``, imported at the first piece hashed: it loads Numba, which
    importing gds_kvcache must not (see ``kernels.checksum_cpu``)."""
    from ..kernels import checksum_pieces
    return checksum_pieces


def words_of(buf: np.ndarray) -> np.ndarray:
    """``buf`` (a page-aligned slab's uint8 array) viewed as uint64 words, for ``PieceSums``."""
    return buf[: buf.shape[0] // 8 * 8].view(np.uint64)


class PieceSums:
    """Checksums of ``objs`` (all in one host slab ``buf``; ``words`` is ``words_of(buf)``), fed by
    ``__call__(mem_offset, nbytes)`` for each piece of slab bytes a transfer moves, from any thread."""

    def __init__(self, buf: np.ndarray, words: np.ndarray, objs: Sequence[MemoryObj]):
        # ``words``: ``buf`` as uint64 (``words_of``); slabs are page-aligned, so word j is bytes 8j..8j+7.
        self._b = buf
        self._words = words
        self._objs = list(objs)
        self._order = sorted(range(len(objs)), key=lambda i: objs[i].offset)
        self._starts = [objs[i].offset for i in self._order]
        # Whole words only: the tail word and the length term are added by ``result``.
        self._ends = [objs[i].offset + objs[i].nbytes // 8 * 8 for i in self._order]
        self._sums = [0] * len(objs)
        self._covered = [0] * len(objs)
        self._lock = threading.Lock()

    def __call__(self, mem_offset: int, nbytes: int) -> None:
        """Hash the whole words of every object inside slab bytes [mem_offset, +nbytes)."""
        starts, ends = self._starts, self._ends
        stop = mem_offset + nbytes
        k = max(bisect.bisect_right(starts, mem_offset) - 1, 0)
        while k < len(starts) and starts[k] < stop:
            lo, hi = max(mem_offset, starts[k]), min(stop, ends[k])
            if lo < hi and lo % 8 == 0 and hi % 8 == 0:
                s = _pieces().word_sum(self._words[lo // 8: hi // 8], (lo - starts[k]) // 8)
                i = self._order[k]
                with self._lock:
                    self._sums[i] += s
                    self._covered[i] += hi - lo
            k += 1

    def result(self, which: Optional[Sequence[int]] = None) -> list[int]:
        """The checksums (as ``checksum_host`` of each object's ``nbytes``) of the objects numbered
        ``which`` (positions in ``objs``; default all), in that order."""
        which = range(len(self._objs)) if which is None else which
        out: list = []
        redo = []
        for i in which:
            o = self._objs[i]
            out.append(None)
            if self._covered[i] == o.nbytes // 8 * 8:
                out[-1] = _pieces().checksum_finish(self._sums[i] & _MASK, self._b[o.offset: o.offset + o.nbytes])
            else:
                redo.append((len(out) - 1, i))
        if redo:
            sums = checksum_batch(self._b, [(self._objs[i].offset, self._objs[i].nbytes) for _, i in redo])
            for (pos, _), s in zip(redo, sums):
                out[pos] = s
        return out

    @property
    def complete(self) -> int:
        """How many objects every piece of has been hashed (for tests and profiles)."""
        return sum(c == o.nbytes // 8 * 8 for c, o in zip(self._covered, self._objs))
