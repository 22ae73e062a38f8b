"""The shared tier's settings and counters: what a ``SharedDiskBackend`` is opened with, resolved
and validated in one place.

Invariant: every setting comes from the config's validated fields unless a constructor argument
overrides it (tests, tools), and an override is validated exactly as the field is, with a
``ConfigError`` that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config import CacheEngineConfig
from ..config.values import WRITER_ID_ALLOWED, is_writer_id
from ..errors import ConfigError

__all__ = ["COUNTERS", "SharedSettings", "redis_config_errors"]

#: The shared tier's counters (``stats``, besides the local tier's); the README lists them.
COUNTERS = ("published", "duplicates", "republishes", "remote_hits", "remote_misses", "lease_expired",
            "remote_corrupt", "remote_malformed", "claims_lost", "redis_errors", "leased_evictions",
            "shared_evictions", "retracted", "local_only_puts", "removed_unretracted", "state_went_back",
            "audit_republished", "adopted", "leased_skips", "evict_errors", "remote_read_errors", "put_retries",
            "tombstoned", "remote_removed")


def redis_config_errors() -> tuple:
    """Errors at start that waiting will not cure: a wrong password, a database out of range."""
    from redis import exceptions as e
    return (e.AuthenticationError, e.AuthorizationError, e.ResponseError)


@dataclass(frozen=True)
class SharedSettings:
    """The resolved settings of one shared-tier process (seconds for the times)."""

    url: str
    shared_dir: str
    writer_id: Optional[str]
    lease_ttl: float
    claim_ttl: float
    tick: float

    @classmethod
    def resolve(cls, config: CacheEngineConfig, writer_id: Optional[str] = None,
                lease_ttl: Optional[float] = None, claim_ttl: Optional[float] = None,
                tick: Optional[float] = None) -> "SharedSettings":
        """The config's shared-mode fields, each overridden by its argument where that is not None."""
        url = config.lookup_server_url
        if not url:
            raise ConfigError("lookup_server_url", url, "a redis:// URL for shared mode")
        if config.local_disk is None:
            raise ConfigError("local_disk", None, "the shared directory (every process gives the same path)")
        writer_id = config.writer_id if writer_id is None else writer_id
        lease_ttl = config.lease_ttl if lease_ttl is None else lease_ttl
        claim_ttl = config.claim_ttl if claim_ttl is None else claim_ttl
        tick = config.shared_tick if tick is None else tick
        if writer_id is not None and not is_writer_id(writer_id):
            raise ConfigError("writer_id", writer_id, WRITER_ID_ALLOWED)
        for name, v in (("lease_ttl", lease_ttl), ("claim_ttl", claim_ttl), ("tick", tick)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 3600:
                raise ConfigError(name, v, "seconds, more than 0 and less than 3600")
        return cls(url, os.path.abspath(config.local_disk), writer_id, lease_ttl, claim_ttl, tick)
