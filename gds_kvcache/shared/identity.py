"""The identity of a shared cache directory: its ``cache-id``, the Redis namespace of its chunks.

Invariant: the id file is written in full under a temporary name and linked
into place, so it is never seen empty, and of two processes creating it at
once one link wins; every process of one cache agrees on the id whatever the
mount point, and two caches sharing one Redis server never share a namespace.

A copy of a cache directory (``cp -a``, a restored backup) is a new cache:
``cache-id.origin`` records the inode of the id file it belongs with (the
same on every node of one file system), and an id file found under another
inode gets a new id, under a lock, so the copy never speaks for the
original's chunks in Redis.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import uuid
from typing import Iterator, Optional

from ..errors import ConfigError, StorageUnavailableError

__all__ = ["CACHE_ID_NAME", "cache_id", "writer_ids"]

CACHE_ID_NAME = "cache-id"
ORIGIN_NAME = "cache-id.origin"

log = logging.getLogger(__name__)


def cache_id(shared_dir: str) -> str:
    """The shared directory's id (created by the first process to open it): the Redis namespace
    of its chunks, the same on every node whatever the mount point, and different for two caches
    sharing one Redis server.

    Raises
    ------
    StorageUnavailableError
        The directory or its id file cannot be created or read.
    ConfigError
        The id file holds something else than an id.
    """
    path = os.path.join(shared_dir, CACHE_ID_NAME)
    try:
        os.makedirs(shared_dir, exist_ok=True)
        if not os.path.exists(path):
            # Written in full under a temporary name, then linked into place: the id file is
            # never seen empty, and of two processes creating it at once one link wins.
            tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(uuid.uuid4().hex[:16] + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        text = _read_id(path)
        if re.fullmatch(r"[0-9a-f]{16}", text) and not _origin_matches(shared_dir, path):
            text = _settle_copy(shared_dir, path)
    except OSError as e:
        raise StorageUnavailableError(f"shared directory {shared_dir!r}: cannot create or read its "
                                      f"{CACHE_ID_NAME} file: {e.strerror or e}") from None
    if not re.fullmatch(r"[0-9a-f]{16}", text):
        raise ConfigError("local_disk", shared_dir, f"a shared directory whose {CACHE_ID_NAME} file holds 16 hex "
                          f"digits (it holds {text[:40]!r}); delete that file to start a new cache there")
    return text


def _read_id(path: str) -> str:
    with open(path) as f:
        return f.read(64).strip()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _origin_matches(shared_dir: str, path: str) -> bool:
    try:
        with open(os.path.join(shared_dir, ORIGIN_NAME)) as f:
            return f.read(64).strip() == str(os.stat(path).st_ino)
    except (FileNotFoundError, ValueError):
        return False


def _settle_copy(shared_dir: str, path: str) -> str:
    """Under the directory's id lock: record the id file's inode where none is recorded (a
    directory made before origins existed), or give a copied directory a new id. Returns the id."""
    fd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY)     # the lock is on the directory itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        origin = os.path.join(shared_dir, ORIGIN_NAME)
        if _origin_matches(shared_dir, path):           # another process settled it meanwhile
            return _read_id(path)
        if os.path.exists(origin):
            old = _read_id(path)
            _write_atomic(path, uuid.uuid4().hex[:16] + "\n")
            log.warning("%s is a copy of another cache directory (its %s moved from another inode): new "
                        "cache id %s instead of %s, so it never speaks for the original's chunks",
                        shared_dir, CACHE_ID_NAME, _read_id(path), old)
        _write_atomic(origin, f"{os.stat(path).st_ino}\n")
        return _read_id(path)
    finally:
        os.close(fd)


def writer_ids(writer_id: Optional[str]) -> Iterator[str]:
    """The writer ids a process tries, in order: ``writer_id`` alone, or ``<hostname>-<n>`` for
    n = 0, 1, ... (the first free one: a restarted process gets its old directory back)."""
    if writer_id is not None:
        yield writer_id
        return
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:48]
    for n in range(1024):
        yield f"{host}-{n}"
