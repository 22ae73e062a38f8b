"""Dropping a file's pages from the page cache, so a read that follows comes from the disk."""

from __future__ import annotations

import os
from typing import Iterable

__all__ = ["drop_page_cache"]


def drop_page_cache(paths: Iterable[str]) -> None:
    """``fsync`` then ``POSIX_FADV_DONTNEED`` each file (a no-op on tmpfs, whose pages are the data)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
