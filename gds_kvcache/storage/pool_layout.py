"""A pool's layout: its files, their size and the interleave, and the one reader of it.

``PoolLayout`` is read from a directory's layout file or from a shared
index's hash; every value is validated there (``from_fields``), so code that
maps offsets to files never meets a layout it cannot use. ``pieces`` is the
interleave itself: it depends on the file count and the unit only, never on
the file size, so a budget change moves no chunk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import GdsKvCacheError, StorageUnavailableError
from ..units import MiB, PAGE, align_down

__all__ = ["INDEX_NAME", "LAYOUT_NAME", "LAYOUT_VERSION", "LOCK_NAME", "LayoutError", "POOL_NAME", "PoolLayout",
           "UNIT", "index_reserve", "pieces", "pool_layout"]

POOL_NAME = "kvcache.pool"
INDEX_NAME = "kvcache.index"
LOCK_NAME = "kvcache.lock"
LAYOUT_NAME = "kvcache.layout"
#: The pool is interleaved over its files in units of this many bytes
#: (RAID-0 style): logical unit ``u`` is unit ``u // files`` of file
#: ``u % files``. Any transfer of more than one unit spreads over the files,
#: and a chunk may span files, so no space is lost at file ends.
UNIT = 4 * MiB
LAYOUT_VERSION = 2


def pool_layout(cap: int, pool_files: int) -> tuple[int, int, int]:
    """(files, bytes per file, interleave unit) for a disk budget of ``cap`` bytes.

    Files are page multiples, not unit multiples: the tail of each file past
    its last whole unit still holds chunks (``PoolDirectory.holes``), so no
    budget is lost to rounding, and the unit never depends on the budget.
    """
    pool = align_down(cap - index_reserve(cap))
    # At least one whole unit per file: file tails past the last whole unit
    # are separate regions, and a pool of tails alone could not hold a chunk
    # bigger than a tail.
    files = max(1, min(pool_files, pool // UNIT))
    return files, align_down(pool // files), UNIT


def pieces(offset: int, nbytes: int, files: int, unit: int):
    """``(file, offset in file, offset into the range, bytes)`` for logical ``[offset, +nbytes)``.

    Logical unit ``u`` is unit ``u // files`` of file ``u % files``. The map
    depends on the file count and the unit only, never on the file size, so
    a budget change moves no chunk.
    """
    out = []
    pos, end = offset, offset + nbytes
    while pos < end:
        u, within = divmod(pos, unit)
        n = min(unit - within, end - pos)
        out.append((u % files, (u // files) * unit + within, pos - offset, n))
        pos += n
    return out


def index_reserve(cap: int) -> int:
    """Bytes of the disk budget kept for the index (the rest is the pool).

    1/32 of the budget up to 1 GiB, then 1/256 (no fixed cap): at 64 bytes a
    record and room for two snapshots, that indexes a full pool of 4 KiB chunks
    under 32 GiB budgets and of 32 KiB chunks above. Past that the index tier
    evicts LRU chunks rather than exceed the budget.
    """
    return align_down(max(64 * PAGE, min(cap // 32, max(1024 * MiB, cap // 256))))


class LayoutError(GdsKvCacheError, ValueError):
    """A pool layout that cannot be used (a missing, non-integer or out-of-range field)."""


#: Most pool files a layout may name (the config allows 64; older directories fewer).
_MAX_STRIPES = 1024


@dataclass(frozen=True)
class PoolLayout:
    """Where a pool's bytes lie: ``stripes`` files of ``stripe_bytes`` in directory ``path``,
    interleaved in ``unit``-byte units (see ``pieces``)."""

    path: str
    stripes: int
    stripe_bytes: int
    unit: int

    @classmethod
    def from_fields(cls, path: str, fields: Mapping) -> "PoolLayout":
        """A layout from its fields (a layout file's JSON, a shared index's hash), validated.

        Raises ``LayoutError`` naming the first field that is missing, not an
        integer, or out of range.
        """
        vals = []
        for name, lo, hi in (("stripes", 1, _MAX_STRIPES), ("stripe_bytes", PAGE, 1 << 50),
                             ("unit", PAGE, 1 << 40)):
            raw = fields.get(name) if isinstance(fields, Mapping) else None
            if isinstance(raw, bytes):
                raw = raw.decode("ascii", "replace")
            try:
                v = int(raw)
            except (TypeError, ValueError):
                raise LayoutError(f"pool layout field {name!r} is {raw!r}, not an integer") from None
            if isinstance(raw, bool) or not lo <= v <= hi or (name != "stripes" and v % PAGE):
                raise LayoutError(f"pool layout field {name!r} is {v}: allowed {lo}..{hi}"
                                  f"{'' if name == 'stripes' else ', a multiple of 4096'}")
            vals.append(v)
        return cls(path, *vals)

    @classmethod
    def read(cls, path: str) -> "PoolLayout":
        """The layout of directory ``path`` from its layout file (written by its owner).

        Raises ``StorageUnavailableError`` if there is none or it is unusable.
        """
        try:
            with open(os.path.join(path, LAYOUT_NAME)) as f:
                fields = json.load(f)
            return cls.from_fields(path, fields)
        except (OSError, ValueError) as e:
            raise StorageUnavailableError(f"{path!r} has no usable {LAYOUT_NAME} ({e})") from None

    @property
    def pool_paths(self) -> list[str]:
        return [os.path.join(self.path, f"{POOL_NAME}.{i}") for i in range(self.stripes)]

    def fields(self) -> dict:
        """What ``from_fields`` reads back."""
        return {"stripes": self.stripes, "stripe_bytes": self.stripe_bytes, "unit": self.unit}

    def pieces(self, offset: int, nbytes: int):
        """Where logical ``[offset, +nbytes)`` lies: ``[(file, offset in file, offset into range, bytes)]``."""
        return pieces(offset, nbytes, self.stripes, self.unit)

    def fits(self, offset: int, nbytes: int) -> bool:
        """Whether logical ``[offset, +nbytes)`` lies inside the files."""
        if offset < 0 or nbytes < 0:
            return False
        if offset + nbytes <= self.stripe_bytes // self.unit * self.unit * self.stripes:
            return True  # within the rows of whole units
        return all(local + n <= self.stripe_bytes for _, local, _, n in self.pieces(offset, nbytes))


