"""The worker-to-scheduler channel: one small result file per transfer and shard.

vLLM tells the scheduler only *that* a transfer job finished. The index
needs more: the checksum and size of each chunk written (its index record)
and which chunks a load found corrupt (to drop them). The worker writes
that into ``<root>/jobs/<token>.<shard>.json`` (temporary name, then an
atomic rename) *before* it reports the job finished; the scheduler reads
and deletes it when vLLM hands it the completion. Both processes run on
the host that holds the directory, so a file is the simplest local channel
that survives either side being in another process.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

__all__ = ["JOBS_DIR", "write_result", "take_result", "result_path"]

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"


def result_path(root: str, token: str, shard: int) -> str:
    return os.path.join(root, JOBS_DIR, f"{token}.{shard}.json")


def write_result(root: str, token: str, shard: int, payload: dict) -> None:
    """Publish ``payload`` for ``token`` (atomic: the reader sees all of it or nothing)."""
    path = result_path(root, token, shard)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def take_result(root: str, token: str, shard: int) -> Optional[dict]:
    """The payload for ``token`` (and the file removed), or None if the worker wrote none."""
    path = result_path(root, token, shard)
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a torn or unreadable file is a failed job, never a guess
        log.warning("unreadable transfer result %s: %s", path, e)
        payload = None
    try:
        os.unlink(path)
    except OSError:
        pass
    return payload
