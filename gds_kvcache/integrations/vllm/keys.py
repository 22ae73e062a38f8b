"""``KeyMaker``: vLLM offload keys -> the library's chunk keys, one per tensor-parallel shard."""

from __future__ import annotations

import hashlib
import os

from ...key import CacheEngineKey

__all__ = ["KeyMaker"]


class KeyMaker:
    """vLLM offload keys -> chunk keys of one shard.

    The hash covers the offload key (block hash and KV group) and the
    geometry that gives the chunk its bytes (model, KV dtype, bytes per
    block, blocks per chunk, world size), so another model or parallel
    layout misses instead of loading bytes of another shape.
    """

    def __init__(self, model: str, geometry: str, world_size: int):
        self.model = (os.path.basename(model.rstrip("/")) or "model")[:64]
        self.world_size = world_size
        self._seed = hashlib.blake2b(f"{model}|{geometry}|{world_size}".encode(), digest_size=16).digest()

    def __call__(self, okey: bytes, shard: int) -> CacheEngineKey:
        h = hashlib.blake2b(bytes(okey), digest_size=32, key=self._seed).hexdigest()
        return CacheEngineKey("vllm", self.model, self.world_size, shard, h)
