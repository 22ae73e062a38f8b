import pytest

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata, ConfigError, LMCacheEngineConfig
from gds_kvcache.units import GB


def test_defaults_and_alias():
    c = LMCacheEngineConfig()
    assert isinstance(c, CacheEngineConfig)
    assert c.slab_bytes == int(c.max_local_cpu_size * GB)


@pytest.mark.parametrize("field,value", [
    ("chunk_size", 0), ("chunk_size", "abc"), ("chunk_size", 2.5), ("max_local_cpu_size", -1),
    ("max_local_cpu_size", float("nan")), ("io_engine", "gds"), ("io_threads", 0), ("io_threads", 1000),
    ("io_task_size", 5000), ("io_task_size", 1024), ("memory_device", "tpu"), ("direct_io", "maybe"),
    ("slab_size", 0), ("cuda_device", -1), ("local_cpu", 3),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig(**{field: value})
    assert e.value.field == field
    assert field in str(e.value) and "allowed" in str(e.value)


def test_disk_needs_a_size(tmp_path):
    with pytest.raises(ConfigError, match="max_local_disk_size"):
        CacheEngineConfig(local_disk=str(tmp_path))
    c = CacheEngineConfig(local_disk=f"file://{tmp_path}", max_local_disk_size=0.5)
    assert c.local_disk == str(tmp_path)


def test_from_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"chunk_size: 128\nlocal_disk: {tmp_path}\nmax_local_disk_size: 2\nio_engine: posix\n"
                 "direct_io: false\n")
    c = CacheEngineConfig.from_file(p)
    assert (c.chunk_size, c.max_local_disk_size, c.io_engine, c.direct_io) == (128, 2.0, "posix", False)
    p.write_text("chunk_size: 128\nno_such_field: 1\n")
    with pytest.raises(ConfigError, match="no_such_field"):
        CacheEngineConfig.from_file(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError):
        CacheEngineConfig.from_file(p)


def test_from_env(tmp_path):
    env = {"GDS_KVCACHE_CHUNK_SIZE": "64", "LMCACHE_LOCAL_DISK": str(tmp_path),
           "GDS_KVCACHE_MAX_LOCAL_DISK_SIZE": "1.5", "GDS_KVCACHE_IO_THREADS": "8",
           "GDS_KVCACHE_DIRECT_IO": "off", "GDS_KVCACHE_SLAB_SIZE": "none"}
    c = CacheEngineConfig.from_env(env)
    assert (c.chunk_size, c.local_disk, c.max_local_disk_size, c.io_threads, c.direct_io, c.slab_size) == (
        64, str(tmp_path), 1.5, 8, False, None)
    with pytest.raises(ConfigError, match="io_threads"):
        CacheEngineConfig.from_env({"GDS_KVCACHE_IO_THREADS": "many"})


@pytest.mark.parametrize("kw,field", [
    (dict(model_name=""), "model_name"), (dict(world_size=0), "world_size"), (dict(worker_id=4), "worker_id"),
    (dict(kv_shape=(32, 3, 256, 8, 128)), "kv_shape"), (dict(kv_shape=(32, 2, 256)), "kv_shape"),
])
def test_metadata_validation(kw, field):
    import torch

    base = dict(model_name="m", world_size=4, worker_id=0, fmt="vllm", kv_dtype=torch.bfloat16,
                kv_shape=(32, 2, 256, 8, 128))
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        CacheEngineMetadata(**base)
    assert e.value.field == field
