"""Shared mode: many processes (ranks, replicas, nodes) on one cache directory, indexed in Redis.

Set ``lookup_server_url`` and every process given the same ``local_disk`` shares one cache::

    config = CacheEngineConfig(local_disk="/mnt/pfs/kvcache", max_local_disk_size=200,
                               lookup_server_url="redis://redis-host:6379/0")
    engine = CacheEngine(config, metadata)          # or StorageManager(config)

``StorageManager`` then builds a ``SharedDiskBackend`` as its disk tier: this process writes only
``<local_disk>/writers/<hostname>-<n>/`` within its own ``max_local_disk_size`` and reads every
other writer's files read-only. Across nodes, mount the same parallel file system at the same path
on every node and run one ``redis-server --save '' --appendonly no`` that all of them reach.
Without ``lookup_server_url`` nothing changes: ``LocalDiskBackend`` alone, and nothing imports
``redis``.
"""

from .local_redis import LocalRedis, find_redis_server
from .redis_index import Published, RedisIndex
from .shared_backend import WRITERS_DIR, SharedDiskBackend, cache_id

__all__ = ["LocalRedis", "find_redis_server", "Published", "RedisIndex", "SharedDiskBackend", "WRITERS_DIR",
           "cache_id"]
