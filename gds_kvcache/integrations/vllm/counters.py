"""The scheduler-side counters of the plug-in, overall and per KV cache group, and their stats file.

Invariant: the file is rewritten only when a counter changed since the last write, and replaced
atomically (a reader sees the old or the new counters, never half a file); failing to write it
is logged, never raised, since counters are advisory.
"""

from __future__ import annotations

import json
import logging
import os

__all__ = ["GROUP_KEYS", "ManagerCounters"]

log = logging.getLogger(__name__)

#: The counters kept per KV cache group (``groups`` in the stats file, label ``group`` in vLLM's metrics).
GROUP_KEYS = ("lookups", "hits", "hit_tokens", "chunks_loaded", "bytes_loaded", "chunks_stored", "bytes_stored")
#: The overall counters.
KEYS = ("lookups", "hits", "pending_hits", "loads", "chunks_loaded", "load_failures", "stores", "chunks_stored",
        "store_failures", "store_refused", "evictions", "hit_tokens", "bytes_loaded", "bytes_stored")


class ManagerCounters:
    """``stats`` (name -> count) and ``groups`` (vLLM's group id -> ``GROUP_KEYS`` counts)."""

    def __init__(self):
        self.stats: dict[str, int] = dict.fromkeys(KEYS, 0)
        self.groups: dict[int, dict[str, int]] = {}
        self.dirty = True

    def bump(self, name: str, n: int = 1) -> None:
        self.stats[name] += n
        self.dirty = True

    def bump_group(self, group: int, name: str, n: int = 1) -> None:
        st = self.groups.get(group)
        if st is None:
            st = self.groups[group] = dict.fromkeys(GROUP_KEYS, 0)
        st[name] += n
        self.dirty = True

    def write(self, path: str, chunks: int) -> None:
        """Replace the stats file at ``path`` if anything changed (``chunks``: chunks indexed now)."""
        if not self.dirty:
            return
        self.dirty = False
        out = dict(self.stats, chunks=chunks, groups={str(g): dict(v) for g, v in sorted(self.groups.items())})
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(out, f)
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.debug("cannot write %s: %s", path, e)
