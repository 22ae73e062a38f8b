"""The pool's directory: lock, layout file (``pool_layout``), sizing and hole punching.

Invariants: one process holds a directory (an ``flock`` on the directory
itself); the layout file is replaced atomically; a directory records that its
index's checksums are bound to their keys (``checksums_keyed``), so an older
directory is migrated exactly once (``DiskIndex.recover``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
from typing import Optional

from ..errors import DirectoryLockedError, LayoutChangedError, StorageUnavailableError
from ..units import PAGE, align_down
from .pool_layout import (INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, LOCK_NAME, POOL_NAME, UNIT, LayoutError,
                          PoolLayout, index_reserve, pieces, pool_layout)

__all__ = ["PoolDirectory", "PoolLayout", "LayoutError", "punch_hole", "preallocate_keep_size", "index_reserve",
           "pool_layout", "pieces"]

log = logging.getLogger(__name__)

#: Marker file: the index's checksums are bound to their keys (absent in directories of earlier versions).
KEYED_NAME = "kvcache.keyed"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give ``[offset, offset+length)`` back to the file system; False where unsupported."""
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
                        ctypes.c_long(offset), ctypes.c_long(length))
    return r == 0


def preallocate_keep_size(path: str, nbytes: int) -> bool:
    """Reserve blocks for ``path`` up to ``nbytes`` past its start without changing its size;
    False where the file system cannot (or is full)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_KEEP_SIZE), ctypes.c_long(0),
                            ctypes.c_long(nbytes))
        return r == 0
    finally:
        os.close(fd)


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
    The lock is an ``flock`` on the directory itself, so deleting
    ``kvcache.lock`` (which only names the holder's pid) cannot let a second
    process in. The pool is interleaved over its files in ``unit``-byte
    units. Opening a directory with another ``max_local_disk_size`` resizes
    the files in place: chunks that still lie inside the new pool are kept,
    the rest are dropped with a warning (``old_layout`` tells the index).
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
        # The lock is on the directory itself: a lock file can be unlinked
        # under its holder (and a second process would then lock a new one).
        self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
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
            self._write_owner()
            self.index_path = os.path.join(self.path, INDEX_NAME)
            self.stripes, self.stripe_bytes, self.unit = pool_layout(cap_bytes, pool_files)
            self.old_layout = self._check_layout(cap_bytes)
            self._settle_keyed()
            self.pool_paths = [os.path.join(self.path, f"{POOL_NAME}.{i}") for i in range(self.stripes)]
            self._warn_free_space(cap_bytes)
            for p in self.pool_paths:
                self._open_stripe(p, preallocate)
        except BaseException:
            self.release()
            raise

    def _write_owner(self) -> None:
        # Informational only (who holds the directory); the lock is the flock above.
        try:
            with open(os.path.join(self.path, LOCK_NAME), "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError:
            pass

    def _existing_layout(self) -> tuple[Optional[tuple[int, int, int]], str]:
        """(files, bytes per file, unit) the directory was written with, and where that came from."""
        try:
            with open(os.path.join(self.path, LAYOUT_NAME)) as f:
                have = json.load(f)
            if have.get("version") == LAYOUT_VERSION:
                lay = PoolLayout.from_fields(self.path, have)
                return (lay.stripes, lay.stripe_bytes, lay.unit), "layout file"
            lay = PoolLayout.from_fields(self.path, dict(have, unit=UNIT))
            return (lay.stripes, lay.stripe_bytes, 0), "layout file of version 1"
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s: unreadable %s; inferring the layout from the pool files", self.path, LAYOUT_NAME)
        # No (readable) layout file: the pool files themselves say it (every
        # file is created at exactly its size; the unit is the library's).
        sizes = []
        while os.path.exists(os.path.join(self.path, f"{POOL_NAME}.{len(sizes)}")):
            sizes.append(os.stat(os.path.join(self.path, f"{POOL_NAME}.{len(sizes)}")).st_size)
        if sizes and len(set(sizes)) == 1 and sizes[0] > 0 and sizes[0] % PAGE == 0:
            return (len(sizes), sizes[0], UNIT), "pool file sizes"
        return None, "none"

    def _check_layout(self, cap_bytes: int) -> Optional[tuple[int, int, int]]:
        """Settle the layout and resize the pool files to it; the old layout if it differed.

        Files are resized in place, never wiped, and the interleave does not
        depend on their size: after a budget change ``DiskIndex`` keeps every
        chunk that still lies inside the files. A different ``pool_files`` on a
        directory that has files is overridden by the directory's own count
        (with a warning), since a new interleave would move every chunk.
        """
        want = (self.stripes, self.stripe_bytes, self.unit)
        have, source = self._existing_layout()
        if have is not None and have[2] and have[0] != want[0]:
            log.warning("%s: keeping the directory's %d pool files (pool_files=%d asked): a new interleave "
                        "would move every stored chunk", self.path, have[0], want[0])
            pool = align_down(cap_bytes - index_reserve(cap_bytes))
            want = (have[0], align_down(pool // have[0]), have[2])
            if want[1] <= 0:
                raise LayoutChangedError(
                    f"local_disk {self.path!r} has {have[0]} pool files; max_local_disk_size="
                    f"{cap_bytes / (1 << 30):.4g} GB cannot give each a page. Use a larger budget or another "
                    "directory")
            self.stripes, self.stripe_bytes, self.unit = want
        if have is not None and have != want:
            log.warning("disk layout of %s changed from %s to %s files x bytes x unit (%s): keeping the chunks "
                        "that still lie inside the files", self.path, have, want, source)
            for i in range(want[0], max(have[0], want[0])):
                try:
                    os.unlink(os.path.join(self.path, f"{POOL_NAME}.{i}"))
                except FileNotFoundError:
                    pass
        if have != want or source != "layout file":
            layout_path = os.path.join(self.path, LAYOUT_NAME)
            tmp = layout_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"version": LAYOUT_VERSION, "stripes": want[0], "stripe_bytes": want[1],
                           "unit": want[2]}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, layout_path)
        return have if have != want else None

    def _settle_keyed(self) -> None:
        # A directory without an index yet starts keyed; one written before keyed checksums has an
        # index and no marker, and its index is migrated once (DiskIndex.recover). The marker is a
        # file of its own, so a lost layout file cannot make an index be migrated twice.
        marker = os.path.join(self.path, KEYED_NAME)
        self.checksums_keyed = os.path.exists(marker)
        if not self.checksums_keyed and not any(n.startswith(INDEX_NAME) for n in os.listdir(self.path)):
            self.mark_checksums_keyed()

    def mark_checksums_keyed(self) -> None:
        """Record that the index's checksums are bound to their keys (after its migration)."""
        with open(os.path.join(self.path, KEYED_NAME), "w") as f:
            f.write("keyed checksums (gds_kvcache.storage.entry.keyed_checksum)\n")
            f.flush()
            os.fsync(f.fileno())
        self.checksums_keyed = True

    @property
    def capacity(self) -> int:
        """Logical pool bytes, holes included (see ``holes``)."""
        return self.stripes * (-(-self.stripe_bytes // self.unit)) * self.unit

    def holes(self) -> dict[int, int]:
        """Logical ``{offset: bytes}`` that no file backs: the part of each last-row unit past
        its file's end. The space allocator keeps them allocated, so no chunk lands there."""
        full, rest = divmod(self.stripe_bytes, self.unit)
        if not rest:
            return {}
        return {(full * self.stripes + f) * self.unit + rest: self.unit - rest for f in range(self.stripes)}

    @property
    def layout(self) -> PoolLayout:
        """The directory's pool layout (what readers of its files need)."""
        return PoolLayout(self.path, self.stripes, self.stripe_bytes, self.unit)

    def fits(self, offset: int, nbytes: int) -> bool:
        """Whether logical ``[offset, +nbytes)`` lies inside the files (``PoolLayout.fits``,
        without building a layout: recovery asks this once per chunk)."""
        if offset + nbytes <= self.stripe_bytes // self.unit * self.unit * self.stripes:
            return True
        return all(local + n <= self.stripe_bytes for _, local, _, n in self.pieces(offset, nbytes))

    def pieces(self, offset: int, nbytes: int):
        """Where logical ``[offset, +nbytes)`` lies: ``[(file, offset in file, offset into range, bytes)]``."""
        return pieces(offset, nbytes, self.stripes, self.unit)

    def _warn_free_space(self, cap_bytes: int) -> None:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize + self.disk_usage()
        if cap_bytes > free:
            log.warning("max_local_disk_size for %s is %.2f GB but its file system has only %.2f GB free "
                        "(counting this cache's own files): puts will evict early or fail with ENOSPC",
                        self.path, cap_bytes / (1 << 30), free / (1 << 30))

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
        """(pool file, offset in it) of a logical pool offset."""
        i, local, _, _ = self.pieces(offset, 1)[0]
        return self.pool_paths[i], local

    def release(self) -> None:
        """Give the directory up; never raises, so a failing close cannot keep the lock."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def disk_usage(self) -> int:
        """Bytes the directory's files take on disk (allocated blocks)."""
        total = 0
        for name in os.listdir(self.path):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total
