"""Whole-file reads and writes of the disk index's files (their bytes; the format is ``index_codec``'s).

``read_mapped`` maps a file read-only rather than copying it (the load of a
10M-chunk index reads 560 MB: a copy costs as much as decoding it);
``write_file`` writes a new file and fsyncs it. Invariant: a mapping is
only read, and the index never shortens a file below what it has decoded
(a torn log tail it cuts lies past every whole slot), so no read of a
mapping meets a page past the end.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterable, Optional, Union

__all__ = ["fsync_dir", "read_bytes", "read_mapped", "write_file"]


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: str) -> Optional[bytes]:
    """The bytes of ``path``, or None if there is no such file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_mapped(path: str) -> Optional[Union[mmap.mmap, bytes]]:
    """``path`` mapped read-only (``b""`` if empty), or None if there is no such file. The mapping
    lives as long as something refers to it or to a view of it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size == 0:
            return b""
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def write_file(path: str, chunks: Iterable) -> int:
    """Write ``chunks`` to ``path`` (truncated first) and fsync it; return its size."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for c in chunks:
            mv = memoryview(c).cast("B")
            while mv:
                w = os.write(fd, mv)
                mv = mv[w:]
                n += w
        os.fsync(fd)
    finally:
        os.close(fd)
    return n
