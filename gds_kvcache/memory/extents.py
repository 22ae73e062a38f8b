"""Offset-space allocator: 4 KiB-aligned extents of one big region.

Used twice: for the memory slab and for the disk pool file. It hands out
byte offsets, never touches memory itself, and is not thread-safe (callers
hold their own lock around it).

Free extents live in power-of-two size classes (a two-level scheme in the
spirit of TLSF) with a bitmap of non-empty classes, and are coalesced with
their neighbours on free through start/end maps. Allocation and free are
O(1) apart from the rare fallback scan of one size class, well inside the
O(log n) budget.

An owner that records millions of extents itself (the disk index, in arrays)
may *untrack* them: they stay allocated and counted, with no Python object
here, until it ``track``s one again to free it. Untracked extents are never
listed by ``extents`` and are checked by ``memcheck`` only when handed in.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from ..units import PAGE, align_up

__all__ = ["ExtentAllocator"]


class ExtentAllocator:
    """Best-effort good-fit allocator over ``[0, capacity)`` in ``align``-sized units.

    Parameters
    ----------
    capacity
        Bytes managed; rounded down to ``align``.
    align
        Granularity of every offset and size (default 4 KiB).
    """

    __slots__ = ("align", "capacity", "_free_start", "_free_end", "_bins", "_bitmap",
                 "_used", "_allocated")

    def __init__(self, capacity: int, align: int = PAGE):
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        self.align = align
        self.capacity = capacity // align * align
        self._free_start: dict[int, int] = {}   # start -> size
        self._free_end: dict[int, int] = {}     # end -> start
        self._bins: list[dict[int, None]] = [dict() for _ in range(64)]
        self._bitmap = 0
        self._used = 0
        self._allocated: dict[int, int] = {}    # start -> size
        if self.capacity:
            self._insert(0, self.capacity)

    # -- free-list plumbing ---------------------------------------------
    def _cls(self, size: int) -> int:
        return (size // self.align).bit_length() - 1

    def _insert(self, start: int, size: int) -> None:
        self._free_start[start] = size
        self._free_end[start + size] = start
        c = self._cls(size)
        self._bins[c][start] = None
        self._bitmap |= 1 << c

    def _remove(self, start: int, size: int) -> None:
        del self._free_start[start]
        del self._free_end[start + size]
        c = self._cls(size)
        b = self._bins[c]
        del b[start]
        if not b:
            self._bitmap &= ~(1 << c)

    # -- public API -------------------------------------------------------
    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.capacity - self._used

    def __len__(self) -> int:
        return len(self._allocated)

    def allocate(self, nbytes: int) -> Optional[int]:
        """Reserve ``nbytes`` (rounded up to ``align``); return the offset or None if full."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        size = align_up(nbytes, self.align)
        units = size // self.align
        # Any extent in class ceil(log2(units)) or above is large enough.
        c = units.bit_length() - 1
        if units & (units - 1):
            c += 1
        candidates = self._bitmap >> c << c
        start = None
        if candidates:
            cls = (candidates & -candidates).bit_length() - 1
            start = next(iter(self._bins[cls]))
        elif c > 0 and self._bitmap >> (c - 1) & 1:
            # Fallback: the class just below may still hold a big-enough extent.
            for s in self._bins[c - 1]:
                if self._free_start[s] >= size:
                    start = s
                    break
        if start is None:
            return None
        ext = self._free_start[start]
        self._remove(start, ext)
        if ext > size:
            self._insert(start + size, ext - size)
        self._allocated[start] = size
        self._used += size
        return start

    def allocate_run(self, sizes) -> Optional[list[int]]:
        """Reserve adjacent extents of ``sizes`` bytes (each rounded up) in one free region.

        Returns their offsets, or None when no single free region holds them all
        (the caller then falls back to ``allocate`` per extent). Each extent is
        freed on its own later, so a batch written as one transfer can still be
        evicted chunk by chunk.
        """
        units = [align_up(n, self.align) for n in sizes]
        if not units or min(units) <= 0:
            raise ValueError(f"sizes must be > 0, got {list(sizes)}")
        start = self.allocate(sum(units))
        if start is None:
            return None
        del self._allocated[start]
        offs = []
        pos = start
        for n in units:
            self._allocated[pos] = n
            offs.append(pos)
            pos += n
        return offs

    def free_extent(self, start: int) -> int:
        """Release the extent at ``start``; return its size. Coalesces with neighbours."""
        size = self._allocated.pop(start, None)
        if size is None:
            raise KeyError(f"offset {start} is not an allocated extent")
        self._used -= size
        freed = size
        end = start + size
        prev_start = self._free_end.get(start)
        if prev_start is not None:
            prev_size = self._free_start[prev_start]
            self._remove(prev_start, prev_size)
            start, size = prev_start, size + prev_size
        next_size = self._free_start.get(end)
        if next_size is not None:
            self._remove(end, next_size)
            size += next_size
        self._insert(start, size)
        return freed

    def reserve(self, start: int, nbytes: int) -> None:
        """Mark ``[start, start+nbytes)`` allocated (used to rebuild state at start-up).

        Raises ``ValueError`` if any part of the range is not free.
        """
        size = align_up(nbytes, self.align)
        if start % self.align or start < 0 or start + size > self.capacity:
            raise ValueError(f"extent [{start}, {start + size}) is misaligned or out of range")
        # O(free extents): only used while rebuilding state at start-up.
        host = self._containing_free(start, size)
        if host is None:
            raise ValueError(f"extent [{start}, {start + size}) overlaps an allocated extent")
        hs, hsize = host
        self._remove(hs, hsize)
        if start > hs:
            self._insert(hs, start - hs)
        if hs + hsize > start + size:
            self._insert(start + size, hs + hsize - start - size)
        self._allocated[start] = size
        self._used += size

    def rebuild(self, allocated: dict[int, int]) -> None:
        """Reset to exactly ``allocated`` (``{start: nbytes}``) in O(n log n); the rest is free.

        Raises ``ValueError`` for a misaligned, out-of-range or overlapping extent.
        """
        mask = self.align - 1
        spans = sorted(allocated.items())
        self._free_start.clear()
        self._free_end.clear()
        for b in self._bins:
            b.clear()
        self._bitmap = 0
        self._allocated = {}
        self._used = 0
        pos = 0
        used = 0
        alloc = self._allocated
        for s, n in spans:
            n = (n + mask) & ~mask
            if s & mask or s < pos or s + n > self.capacity or n <= 0:
                raise ValueError(f"extent [{s}, {s + n}) is misaligned, out of range or overlaps another")
            if s > pos:
                self._insert(pos, s - pos)
            alloc[s] = n
            used += n
            pos = s + n
        self._used = used
        if pos < self.capacity:
            self._insert(pos, self.capacity - pos)

    def untrack(self, start: int) -> int:
        """Stop recording the allocated extent at ``start`` (it stays allocated and counted);
        return its size. The caller records it and ``track``s it again before it is freed."""
        return self._allocated.pop(start)

    def track(self, start: int, size: int) -> None:
        """Record again an allocated extent that was untracked (``untrack`` or ``rebuild_untracked``)."""
        assert start not in self._allocated, f"extent {start} is tracked already"
        self._allocated[start] = size

    def rebuild_untracked(self, starts: np.ndarray, sizes: np.ndarray, tracked: dict[int, int]) -> None:
        """Reset to exactly the extents ``starts``/``sizes`` (sorted by start, allocated untracked)
        and ``tracked`` (``{start: nbytes}``, allocated and recorded here); the rest is free.

        NumPy passes over the arrays; Python runs once per free extent and tracked extent.
        Raises ``ValueError`` for a misaligned, out-of-range or overlapping extent.
        """
        mask = self.align - 1
        starts = np.asarray(starts, np.uint64)
        sizes = (np.asarray(sizes, np.uint64) + np.uint64(mask)) & ~np.uint64(mask)
        if tracked:
            t_starts = np.array(sorted(tracked), np.uint64)
            t_sizes = np.array([align_up(tracked[s], self.align) for s in t_starts.tolist()], np.uint64)
            at = np.searchsorted(starts, t_starts)
            starts, sizes = np.insert(starts, at, t_starts), np.insert(sizes, at, t_sizes)
        n = starts.shape[0]
        ends = starts + sizes
        if n and ((starts & np.uint64(mask)).any() or (sizes == 0).any() or int(ends.max()) > self.capacity
                  or (starts[1:] < ends[:-1]).any()):
            raise ValueError("an extent is misaligned, out of range or overlaps another")
        self._free_start.clear()
        self._free_end.clear()
        for b in self._bins:
            b.clear()
        self._bitmap = 0
        self._allocated = {s: align_up(n, self.align) for s, n in tracked.items()}
        self._used = int(sizes.sum())
        prev = np.concatenate([np.zeros(1, np.uint64), ends])
        nxt = np.concatenate([starts, np.array([self.capacity], np.uint64)])
        gaps = np.flatnonzero(nxt > prev)
        for s, e in zip(prev[gaps].tolist(), nxt[gaps].tolist()):
            self._insert(s, e - s)

    def _containing_free(self, start: int, size: int) -> Optional[tuple[int, int]]:
        for s, n in self._free_start.items():
            if s <= start and start + size <= s + n:
                return s, n
        return None

    def allocated_size(self, start: int) -> int:
        return self._allocated[start]

    def extents(self) -> dict[int, int]:
        """Allocated extents, ``{start: size}`` (a copy)."""
        return dict(self._allocated)

    def free_extents(self) -> dict[int, int]:
        return dict(self._free_start)

    def largest_free(self) -> int:
        return max(self._free_start.values(), default=0)

    def memcheck(self, untracked: Iterable[tuple[int, int]] = ()) -> bool:
        """Check every invariant; raise ``AssertionError`` naming the first broken one.

        ``untracked``: the ``(start, size)`` of every untracked extent (without them, a
        pool that has some reads as having gaps)."""
        untracked = list(untracked)
        spans = sorted([(s, n, "free") for s, n in self._free_start.items()]
                       + [(s, n, "used") for s, n in self._allocated.items()]
                       + [(s, n, "used") for s, n in untracked])
        pos = 0
        prev_kind = None
        for s, n, kind in spans:
            assert s == pos, f"gap or overlap at offset {pos} (next extent starts at {s})"
            assert n > 0 and s % self.align == 0 and n % self.align == 0, f"misaligned extent {s}+{n}"
            assert not (kind == "free" and prev_kind == "free"), f"uncoalesced free extents at {s}"
            pos, prev_kind = s + n, kind
        assert pos == self.capacity, f"extents cover {pos} of {self.capacity} bytes"
        assert self._used == sum(self._allocated.values()) + sum(n for _, n in untracked), \
            "used-bytes counter drifted"
        for s, n in self._free_start.items():
            assert self._free_end[s + n] == s, f"end map wrong for free extent {s}"
            assert s in self._bins[self._cls(n)], f"free extent {s} missing from its size class"
        assert len(self._free_end) == len(self._free_start), "end map has stale entries"
        for c, b in enumerate(self._bins):
            assert bool(b) == bool(self._bitmap >> c & 1), f"bitmap wrong for class {c}"
            for s in b:
                assert s in self._free_start and self._cls(self._free_start[s]) == c, \
                    f"class {c} holds a stale extent {s}"
        return True
