"""The pool's directory: lock, layout (stripe files), sizing and hole punching."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os

from ..errors import DirectoryLockedError, StorageUnavailableError
from ..units import MiB, PAGE, align_down

__all__ = ["PoolDirectory", "punch_hole", "index_reserve", "pool_layout"]

log = logging.getLogger(__name__)

POOL_NAME = "kvcache.pool"
INDEX_NAME = "kvcache.index"
LOCK_NAME = "kvcache.lock"
LAYOUT_NAME = "kvcache.layout"
#: Stripes are at least this big. A chunk never spans two stripes, so each
#: stripe can leave up to one chunk's worth unused: with 1 GiB stripes that is
#: at most ~3% for 32 MiB chunks, and pools under 2 GiB are one file.
MIN_STRIPE = 1024 * MiB

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give ``[offset, offset+length)`` back to the file system; False where unsupported."""
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
                        ctypes.c_long(offset), ctypes.c_long(length))
    return r == 0


def pool_layout(cap: int, pool_files: int) -> tuple[int, int]:
    """(stripes, bytes per stripe) for a disk budget of ``cap`` bytes."""
    pool = align_down(cap - index_reserve(cap))
    stripes = max(1, min(pool_files, pool // MIN_STRIPE))
    return stripes, align_down(pool // stripes)


def index_reserve(cap: int) -> int:
    """Bytes of the disk budget kept for the index log (the rest is the pool)."""
    return align_down(min(max(cap // 32, 64 * PAGE), 256 * MiB))


class PoolDirectory:
    """A cache directory owned by one process.

    Files: ``kvcache.pool.<i>`` (the stripes), ``kvcache.index``,
    ``kvcache.layout`` (stripe count and size) and ``kvcache.lock``.

    Raises
    ------
    StorageUnavailableError
        The directory is missing and cannot be created, is not writable, or
        the pool cannot be created or preallocated.
    DirectoryLockedError
        Another process holds the directory.

    Notes
    -----
    The layout is fixed when a directory is first used. Opening it with a
    ``max_local_disk_size`` or ``pool_files`` that gives another layout drops
    the chunks stored there (with a warning) and starts afresh.
    """

    def __init__(self, path: str, cap_bytes: int, pool_files: int = 1, preallocate: bool = False):
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
            self._lock_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DirectoryLockedError(
                    f"local_disk {self.path!r} is in use by another process; give each process "
                    "(each tensor-parallel rank) its own directory") from None
            raise
        try:
            os.ftruncate(self._lock_fd, 0)
            os.write(self._lock_fd, f"{os.getpid()}\n".encode())
            self.index_path = os.path.join(self.path, INDEX_NAME)
            self.stripes, self.stripe_bytes = pool_layout(cap_bytes, pool_files)
            self.pool_paths = [os.path.join(self.path, f"{POOL_NAME}.{i}") for i in range(self.stripes)]
            self._check_layout()
            for p in self.pool_paths:
                self._open_stripe(p, preallocate)
        except BaseException:
            self.release()
            raise

    def _check_layout(self) -> None:
        layout_path = os.path.join(self.path, LAYOUT_NAME)
        want = {"version": 1, "stripes": self.stripes, "stripe_bytes": self.stripe_bytes}
        try:
            with open(layout_path) as f:
                have = json.load(f)
        except FileNotFoundError:
            have = None
        except ValueError:
            have = {"unreadable": True}
        if have == want:
            return
        if have is not None or os.path.exists(self.index_path):
            log.warning("disk layout of %s changed (%s -> %s): dropping the chunks stored there",
                        self.path, have, want)
        for name in os.listdir(self.path):
            if name.startswith(POOL_NAME) or name.startswith(INDEX_NAME):
                os.unlink(os.path.join(self.path, name))
        tmp = layout_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(want, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, layout_path)

    def _open_stripe(self, path: str, preallocate: bool) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageUnavailableError(f"cannot create {path!r}: {e.strerror}") from None
        try:
            # Sparse unless asked: blocks are taken only as chunks are written.
            os.ftruncate(fd, self.stripe_bytes)
            if preallocate:
                try:
                    os.posix_fallocate(fd, 0, self.stripe_bytes)
                except OSError as e:
                    raise StorageUnavailableError(
                        f"cannot preallocate {self.stripe_bytes} bytes for {path!r}: {e.strerror}") from None
        finally:
            os.close(fd)

    def locate(self, offset: int) -> tuple[str, int]:
        """(stripe file, offset in it) of a logical pool offset."""
        i, local = divmod(offset, self.stripe_bytes)
        return self.pool_paths[i], local

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
