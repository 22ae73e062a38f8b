"""The identity of a shared cache directory: its ``cache-id``, the Redis namespace of its chunks.

Invariant: the id file is written in full under a temporary name and linked
into place, so it is never seen empty, and of two processes creating it at
once one link wins; every process of one cache agrees on the id whatever the
mount point, and two caches sharing one Redis server never share a namespace.
"""

from __future__ import annotations

import os
import re
import uuid

from ..errors import ConfigError, StorageUnavailableError

__all__ = ["CACHE_ID_NAME", "cache_id"]

CACHE_ID_NAME = "cache-id"


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
        with open(path) as f:
            text = f.read(64).strip()
    except OSError as e:
        raise StorageUnavailableError(f"shared directory {shared_dir!r}: cannot create or read its "
                                      f"{CACHE_ID_NAME} file: {e.strerror or e}") from None
    if not re.fullmatch(r"[0-9a-f]{16}", text):
        raise ConfigError("local_disk", shared_dir, f"a shared directory whose {CACHE_ID_NAME} file holds 16 hex "
                          f"digits (it holds {text[:40]!r}); delete that file to start a new cache there")
    return text
