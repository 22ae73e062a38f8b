"""Free space of a pool striped over several files, as one logical offset range.

Logical offset ``off`` lives in file ``off // stripe_bytes`` at
``off % stripe_bytes``; no extent crosses a stripe. Spreading chunks over
files lets writes run in parallel where a file system serialises writers of
one file (tmpfs and ext4 buffered writes hold the inode lock).
"""

from __future__ import annotations

from typing import Optional

from ..memory.extents import ExtentAllocator

__all__ = ["StripedSpace"]


class StripedSpace:
    """Same interface as ``ExtentAllocator``, over ``stripes`` equal files."""

    def __init__(self, stripes: int, stripe_bytes: int):
        assert stripes >= 1 and stripe_bytes > 0
        self.stripe_bytes = stripe_bytes
        self.parts = [ExtentAllocator(stripe_bytes) for _ in range(stripes)]
        self._next = 0

    @property
    def capacity(self) -> int:
        return sum(p.capacity for p in self.parts)

    @property
    def used(self) -> int:
        return sum(p.used for p in self.parts)

    def _split(self, off: int) -> tuple[ExtentAllocator, int]:
        return self.parts[off // self.stripe_bytes], off % self.stripe_bytes

    def allocate(self, nbytes: int) -> Optional[int]:
        # Round-robin start so consecutive puts land in different files.
        k = len(self.parts)
        for j in range(k):
            i = (self._next + j) % k
            off = self.parts[i].allocate(nbytes)
            if off is not None:
                self._next = (i + 1) % k
                return i * self.stripe_bytes + off
        return None

    def allocate_run(self, sizes) -> Optional[list[int]]:
        """Adjacent extents for ``sizes`` in one stripe (the next in round-robin order that
        holds them all), so they move as one transfer; None if no stripe does."""
        k = len(self.parts)
        for j in range(k):
            i = (self._next + j) % k
            offs = self.parts[i].allocate_run(sizes)
            if offs is not None:
                self._next = (i + 1) % k
                base = i * self.stripe_bytes
                return [base + o for o in offs]
        return None

    def stripe_of(self, off: int) -> int:
        return off // self.stripe_bytes

    def largest_hole_without(self, stripe: int, evictable: dict[int, int]) -> int:
        """Largest free run ``stripe`` would have if the extents in ``evictable``
        (logical ``{offset: size}``) were freed: whether evicting can ever make room."""
        part = self.parts[stripe]
        base = stripe * self.stripe_bytes
        pinned = sorted((o, n) for o, n in part.extents().items() if base + o not in evictable)
        best, pos = 0, 0
        for o, n in pinned:
            best = max(best, o - pos)
            pos = o + n
        return max(best, part.capacity - pos)

    def free_extent(self, off: int) -> int:
        part, local = self._split(off)
        return part.free_extent(local)

    def rebuild(self, allocated: dict[int, int]) -> None:
        """Reset every stripe to exactly ``allocated`` (logical ``{offset: nbytes}``)."""
        per = [dict() for _ in self.parts]
        for off, n in allocated.items():
            i, local = divmod(off, self.stripe_bytes)
            if off < 0 or i >= len(self.parts):
                raise ValueError(f"offset {off} is outside the pool")
            per[i][local] = n
        for part, extents in zip(self.parts, per):
            part.rebuild(extents)

    def allocated_size(self, off: int) -> int:
        part, local = self._split(off)
        return part.allocated_size(local)

    def extents(self) -> dict[int, int]:
        return {i * self.stripe_bytes + o: n for i, p in enumerate(self.parts) for o, n in p.extents().items()}

    def free_extents(self) -> dict[int, int]:
        return {i * self.stripe_bytes + o: n for i, p in enumerate(self.parts) for o, n in p.free_extents().items()}

    def largest_free(self) -> int:
        return max(p.largest_free() for p in self.parts)

    def memcheck(self) -> bool:
        for p in self.parts:
            p.memcheck()
        return True
