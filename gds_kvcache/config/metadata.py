"""``CacheEngineMetadata``: who produced the KV (model, rank, format, dtype, shape), checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["CacheEngineMetadata"]


@dataclass(frozen=True)
class CacheEngineMetadata:
    """Who produced the KV: model, parallel rank, chunk format, dtype and shape.

    ``kv_shape`` is LMCache's ``(num_layers, 2, chunk_size, num_kv_heads,
    head_size)``; for MLA models the 2 is a 1. ``kv_dtype`` is a
    ``torch.dtype``. Every field is checked when the object is built, with a
    ``ConfigError`` naming the field.

    Notes
    -----
    ``model_name`` and ``fmt`` become part of every cache key and file name,
    so they must be valid Unicode text: a string holding a lone surrogate
    (what ``os.fsdecode`` makes of undecodable bytes) is refused here rather
    than when the first chunk is stored.
    """

    model_name: str
    world_size: int
    worker_id: int
    fmt: str
    kv_dtype: Any
    kv_shape: tuple

    def __post_init__(self) -> None:
        import torch

        for name, example in (("model_name", "such as 'meta-llama/Llama-3.1-8B'"), ("fmt", "such as 'vllm'")):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ConfigError(name, v, f"a non-empty string {example}")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(name, v, "valid Unicode text (this one holds a lone surrogate)") from None
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ConfigError("world_size", self.world_size, "an integer >= 1")
        if not _is_int(self.worker_id) or not 0 <= self.worker_id < self.world_size:
            raise ConfigError("worker_id", self.worker_id, f"an integer in 0..{self.world_size - 1}")
        if not isinstance(self.kv_dtype, torch.dtype):
            raise ConfigError("kv_dtype", self.kv_dtype, "a torch.dtype such as torch.bfloat16")
        allowed = "(num_layers, 2 or 1, chunk_size, num_kv_heads, head_size), all integers >= 1"
        try:
            shape = tuple(self.kv_shape)
        except TypeError:
            raise ConfigError("kv_shape", self.kv_shape, allowed) from None
        if len(shape) != 5 or any(not _is_int(d) or d < 1 for d in shape) or shape[1] not in (1, 2):
            raise ConfigError("kv_shape", self.kv_shape, allowed)
        object.__setattr__(self, "world_size", int(self.world_size))
        object.__setattr__(self, "worker_id", int(self.worker_id))
        object.__setattr__(self, "kv_shape", tuple(int(d) for d in shape))


def _is_int(v: Any) -> bool:
    # bool is an int subclass; True as a world size is a bug, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)
