"""The pool file's directory: lock, sizing and hole punching."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

from ..errors import DirectoryLockedError, StorageUnavailableError
from ..units import MiB, PAGE, align_down

__all__ = ["PoolDirectory", "punch_hole", "index_reserve"]

POOL_NAME = "kvcache.pool"
INDEX_NAME = "kvcache.index"
LOCK_NAME = "kvcache.lock"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give ``[offset, offset+length)`` back to the file system; False where unsupported."""
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
                        ctypes.c_long(offset), ctypes.c_long(length))
    return r == 0


def index_reserve(cap: int) -> int:
    """Bytes of the disk budget kept for the index log (the rest is the pool)."""
    return align_down(min(max(cap // 32, 64 * PAGE), 256 * MiB))


class PoolDirectory:
    """A cache directory owned by one process: ``kvcache.pool``, ``kvcache.index``, ``kvcache.lock``.

    Raises
    ------
    StorageUnavailableError
        The directory is missing and cannot be created, or is not writable.
    DirectoryLockedError
        Another process holds the directory.
    """

    def __init__(self, path: str, cap_bytes: int):
        self.path = os.path.abspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise StorageUnavailableError(f"local_disk {path!r} cannot be created: {e.strerror}") from None
        if not os.path.isdir(self.path):
            raise StorageUnavailableError(f"local_disk {path!r} is not a directory")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageUnavailableError(f"local_disk {path!r} is not writable")
        self._lock_fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DirectoryLockedError(
                    f"local_disk {self.path!r} is in use by another process; give each process "
                    "(each tensor-parallel rank) its own directory") from None
            raise
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.pool_path = os.path.join(self.path, POOL_NAME)
        self.index_path = os.path.join(self.path, INDEX_NAME)
        self.pool_bytes = align_down(cap_bytes - index_reserve(cap_bytes))
        try:
            fd = os.open(self.pool_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.release()
            raise StorageUnavailableError(f"cannot create {self.pool_path!r}: {e.strerror}") from None
        try:
            # Sparse: blocks are taken only as chunks are written.
            os.ftruncate(fd, self.pool_bytes)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def disk_usage(self) -> int:
        """Bytes the directory's files take on disk (allocated blocks)."""
        total = 0
        for name in os.listdir(self.path):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total
