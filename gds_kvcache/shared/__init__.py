"""Shared mode: many processes (ranks, replicas, nodes) on one cache directory, indexed in Redis.

Across nodes: mount the same parallel file system (Lustre, GPFS, WEKA, BeeGFS) at the same path
on every node, run one ``redis-server --save '' --appendonly no`` reachable from all of them, and
give every process the same two settings::

    config = CacheEngineConfig(local_disk="/mnt/pfs/kvcache", max_local_disk_size=200,
                               lookup_server_url="redis://redis-host:6379/0")
    disk = SharedDiskBackend(config, None, allocator)       # writer id: <hostname>-<n>

Each process writes only ``/mnt/pfs/kvcache/writers/<writer id>/`` within its own
``max_local_disk_size`` and reads every other writer's files read-only. Without
``lookup_server_url`` nothing changes: ``LocalDiskBackend`` alone, no Redis.
"""

from .local_redis import LocalRedis, find_redis_server
from .redis_index import Published, RedisIndex
from .shared_backend import WRITERS_DIR, SharedDiskBackend

__all__ = ["LocalRedis", "find_redis_server", "Published", "RedisIndex", "SharedDiskBackend", "WRITERS_DIR"]
