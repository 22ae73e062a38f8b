"""``DiskTransfer``: a batch of chunks between the slab and a pool in few large transfers.

The transfer side of every disk tier, and the one verified read and the one
checksummed write of the library: the local tier, reads of other writers'
chunks (shared mode) and the vLLM worker all move chunk bytes through it.
Chunks that sit next to each other both in the slab and in one pool file
become one span, so a batch stored or read together is one ``pwrite`` /
``pread`` per run (split over the engine's threads by task size), and its
checksums are one kernel launch.

Invariants: ``read_verified`` hands out an object only when its descriptor is
consistent (shape, dtype and byte count agree, the extent lies in the pool),
its bytes were read without error and (``verify``) their checksum, bound to
the descriptor's key (``keyed_checksum``), equals the descriptor's; so an
index or Redis entry that points at another chunk's bytes is a miss too.
Everything else is a miss, reported with its reason, and no object of a miss
outlives the call. It needs no index and no lock: the caller
keeps the extents from reuse while it reads (index pins, leases).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import CorruptChunkError, GdsKvCacheError, ShapeMismatchError
from ..io import IOEngine
from ..io.base import Span
from ..kernels.checksum import checksum_batch
from ..memory.allocator import MemoryAllocatorInterface
from ..memory.format import MemoryFormat, str_to_dtype
from ..memory.obj import MemoryObj
from .entry import keyed_checksum
from .piece_sums import PieceSums, words_of

__all__ = ["DiskTransfer", "VerifiedRead", "is_no_space", "keyed_checksum", "runs"]

log = logging.getLogger(__name__)

#: Smallest mean chunk size hashed piece by piece on the I/O threads: each chunk a piece covers costs
#: two Numba dispatches and a lock there, against a share of one launch for the whole batch after the
#: I/O. On the 2-core CPU machine 64 KiB host-slab gets ran at 0.55x of one launch a batch that way,
#: while 1 MiB chunks gain from the overlap (BENCHMARKS.md, session 7).
PIECE_SUM_MIN_BYTES = 512 << 10


def is_no_space(exc: BaseException) -> bool:
    """Whether a write failed for a full file system (ENOSPC, EDQUOT)."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    # An engine that gives no errno (a RuntimeError from a C++ layer) still says it in words.
    return not isinstance(exc, OSError) and (
        "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc))


def _name(d) -> str:
    k = getattr(d, "key", None)
    return k.to_string() if hasattr(k, "to_string") else str(k)


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


@dataclass
class VerifiedRead:
    """What ``DiskTransfer.read_verified`` gives back for a batch of descriptors.

    ``objs[i]`` is the chunk of descriptor ``i`` (one reference, the caller's)
    or None; ``bad`` lists ``(i, reason)`` for descriptors that are unusable
    (inconsistent, unreadable, or failing the checksum): callers drop those
    from their index. A None without a ``bad`` entry found no slab room.
    """

    objs: list
    bad: list = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(o is not None for o in self.objs)


@functools.lru_cache(maxsize=1024)
def _parse_layout(shape: tuple, dtype: str, fmt: str, nbytes: int) -> tuple:
    """(torch shape, torch dtype, MemoryFormat) of a descriptor's layout; raises what makes it
    unusable. Cached: a cache's chunks share a handful of layouts."""
    try:
        tdtype, tshape, tfmt = str_to_dtype(dtype), torch.Size(shape), MemoryFormat[fmt]
    except (GdsKvCacheError, KeyError, TypeError, ValueError) as e:
        raise ShapeMismatchError(f"unusable layout {shape!r}/{dtype!r}/{fmt!r}: {e}") from None
    if any(n < 0 for n in tshape) or math.prod(tshape) * tdtype.itemsize != nbytes or nbytes <= 0:
        raise ShapeMismatchError(f"shape {tuple(tshape)} of {dtype} is not the {nbytes} bytes stored")
    return tshape, tdtype, tfmt


def _layout_of(d, want) -> tuple:
    """(shape, dtype, fmt) a descriptor's bytes are read as; raises what makes it unusable."""
    try:
        shape, dtype, fmt = _parse_layout(tuple(d.shape), d.dtype, d.fmt, d.nbytes)
    except TypeError as e:        # an unhashable field: a descriptor no index or Redis entry gives
        raise ShapeMismatchError(f"unusable layout {d.shape!r}/{d.dtype!r}/{d.fmt!r}: {e}") from None
    if want is not None:
        want_dtype, want_shape = want
        if want_dtype is not None and want_dtype != dtype:
            raise _Refused(f"holds {d.dtype}, not {want_dtype}")
        if want_shape is not None:
            want_shape = torch.Size(want_shape)
            if any(n < 0 for n in want_shape) or math.prod(want_shape) != math.prod(shape):
                raise _Refused(f"holds shape {tuple(shape)} ({d.nbytes} bytes); cannot load it as "
                               f"{tuple(want_shape)}")
            shape = want_shape
    return shape, dtype, fmt


class _Refused(ShapeMismatchError):
    """The caller asked for a layout the chunk does not have: the caller's error, not the chunk's."""


class DiskTransfer:
    """Moves batches of slab objects to and from pool extents.

    Parameters
    ----------
    engine
        The I/O engine over the pool's files (already attached to the slab).
    pool
        The pool's layout (``PoolLayout``, or a ``PoolDirectory``): its
        interleave maps logical offsets to files.
    """

    def __init__(self, engine: IOEngine, pool):
        self.engine = engine
        self.pool = pool
        self.stats = {"write_calls": 0, "read_calls": 0, "spans": 0, "checksum_calls": 0}
        self._words: tuple = (None, None)   # (slab array, its uint64 view) for PieceSums

    def checksums(self, objs: Sequence[MemoryObj]) -> list[int]:
        """The checksum of each object's logical bytes, in one launch for the batch."""
        if not objs:
            return []
        self.stats["checksum_calls"] += 1
        buf = objs[0].slab.tensor
        # The bytes are complete: the producer was waited for (puts) or the engine synchronised (gets).
        return checksum_batch(buf, [(o.offset, o.nbytes) for o in objs], ordered=False)

    def write_checksummed(self, objs: Sequence[MemoryObj], offsets: Sequence[int], keys: Sequence,
                          on_full: Optional[Callable[[], bool]] = None
                          ) -> tuple[list[int], list[Optional[BaseException]]]:
        """Checksum ``objs`` (one launch) and write them at ``offsets``: (checksums bound to
        ``keys``, per object None or the write's error).

        ``on_full`` is called when writes fail for a full file system
        (ENOSPC/EDQUOT); while it returns True (it made room) those writes are
        tried again.
        """
        pieces = self._piece_sums(objs)
        if pieces is None:
            raw = self.checksums(objs)
            errs = self.write(objs, offsets)
        else:   # hashed by the I/O threads, each piece just before it is written
            errs = self._move(True, objs, offsets, pieces)
            raw = pieces.result()
        sums = [keyed_checksum(c, k) for c, k in zip(raw, keys)]
        while on_full is not None:
            full = [i for i, e in enumerate(errs) if e is not None and is_no_space(e)]
            if not full or not on_full():
                break
            for i, e in zip(full, self.write([objs[i] for i in full], [offsets[i] for i in full])):
                errs[i] = e
        return sums, errs

    def read_verified(self, allocator: MemoryAllocatorInterface, descs: Sequence, verify: bool = True,
                      want: Optional[tuple] = None) -> VerifiedRead:
        """Read the chunks ``descs`` describe (``DiskEntry``-like: offset, nbytes, phys_size,
        shape, dtype, fmt, checksum) into new objects of ``allocator``, one transfer per run and
        one checksum launch for the batch.

        ``want`` is an optional ``(dtype, shape)`` to read every chunk as
        (raises ``ShapeMismatchError`` when a chunk cannot be). Objects are
        allocated in pool order, adjacent where the slab allows; descriptors
        that find no room are misses.
        """
        out = VerifiedRead([None] * len(descs))
        order = sorted(range(len(descs)), key=lambda i: descs[i].offset)
        layouts, idx = [], []
        for i in order:
            d = descs[i]
            try:
                if not self.pool.fits(d.offset, d.phys_size) or d.phys_size % 4096 or d.offset % 4096:
                    raise ShapeMismatchError(f"extent [{d.offset}, +{d.phys_size}) is not in the pool")
                layouts.append(_layout_of(d, want))
            except _Refused as e:
                raise _Refused(f"chunk {_name(d)} {e}") from None
            except ShapeMismatchError as e:
                out.bad.append((i, e))
                continue
            idx.append(i)
        objs = allocator.batched_allocate([s for s, _, _ in layouts], [t for _, t, _ in layouts],
                                          [f for _, _, f in layouts]) if layouts else []
        if len(objs) < len(idx):
            log.debug("no slab room to read %d of %d chunk(s)", len(idx) - len(objs), len(idx))
        try:
            idx = idx[: len(objs)]
            sized = []
            for j, (i, o) in enumerate(zip(idx, objs)):
                if o.phys_size <= descs[i].phys_size:
                    sized.append(j)
                else:   # a phys_size below the 4 KiB-rounded nbytes: reading would pass its extent
                    out.bad.append((i, ShapeMismatchError(f"extent of {descs[i].phys_size} bytes is smaller "
                                                          f"than the chunk's {o.phys_size}")))
            moving = [objs[j] for j in sized]
            pieces = self._piece_sums(moving) if verify else None
            errs = self._move(False, moving, [descs[idx[j]].offset for j in sized], pieces)
            ok, ok_pos = [], []
            for pos, (j, err) in enumerate(zip(sized, errs)):
                if err is None:
                    ok.append(j)
                    ok_pos.append(pos)
                else:
                    out.bad.append((idx[j], err))
            if verify and ok:
                if pieces is None:
                    sums = self.checksums([objs[j] for j in ok])
                else:   # hashed by the I/O threads as each piece arrived
                    sums = pieces.result(ok_pos)
                good = []
                for j, s in zip(ok, sums):
                    d = descs[idx[j]]
                    if keyed_checksum(s, d.key) == d.checksum:
                        good.append(j)
                    else:
                        out.bad.append((idx[j], CorruptChunkError("checksum mismatch")))
                ok = good
            for j in ok:
                out.objs[idx[j]] = objs[j]
        finally:
            kept = {id(o) for o in out.objs if o is not None}
            for o in objs:
                if id(o) not in kept:
                    o.ref_count_down()
        return out

    def write(self, objs: Sequence[MemoryObj], offsets: Sequence[int]) -> list[Optional[BaseException]]:
        """Write each object's ``phys_size`` bytes at its pool offset; per object, None or the error."""
        return self._move(True, objs, offsets)

    def read(self, objs: Sequence[MemoryObj], offsets: Sequence[int]) -> list[Optional[BaseException]]:
        """Read each object's ``phys_size`` bytes from its pool offset; per object, None or the error."""
        return self._move(False, objs, offsets)

    def _piece_sums(self, objs: Sequence[MemoryObj]) -> Optional[PieceSums]:
        """A ``PieceSums`` for ``objs`` where the engine hashes pieces as they move (a host slab),
        else None (the batch is checksummed in one call after or before the transfer)."""
        if not objs or not self.engine.piece_hooks or objs[0].slab.kind == "cuda":
            return None
        if sum(o.nbytes for o in objs) < PIECE_SUM_MIN_BYTES * len(objs):
            return None
        self.stats["checksum_calls"] += 1
        buf = objs[0].slab.host_array()
        if self._words[0] is not buf:    # one slab per tier: made once
            self._words = (buf, words_of(buf))
        return PieceSums(buf, self._words[1], objs)

    def _move(self, write: bool, objs, offsets, pieces: Optional[PieceSums] = None) -> list[Optional[BaseException]]:
        if not objs:
            return []
        spans, which = runs(objs, offsets, self.pool)
        self.stats["write_calls" if write else "read_calls"] += 1
        self.stats["spans"] += len(spans)
        move = self.engine.write_spans if write else self.engine.read_spans
        errs = move(spans) if pieces is None else move(spans, hook=pieces)
        return [next((errs[w] for w in ws if errs[w] is not None), None) for ws in which]
