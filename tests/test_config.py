import dataclasses
import os
import pickle

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineMetadata, ConfigError, LMCacheEngineConfig
from gds_kvcache.config import physical_memory
from gds_kvcache.units import GB


def test_defaults_and_alias():
    c = LMCacheEngineConfig()
    assert isinstance(c, CacheEngineConfig)
    # The default slab is LMCache's 5 GB, bounded by this machine (issue 9 item 17).
    assert c.max_local_cpu_size == 5.0 and c.cpu_size_is_default
    assert c.slab_bytes == c.hot_bytes == c.cpu_bytes <= int(c.max_local_cpu_size * GB)
    explicit = LMCacheEngineConfig(max_local_cpu_size=5.0)
    assert not explicit.cpu_size_is_default and explicit.slab_bytes == 5 * GB


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


# -- machine-sized defaults (issue 9 item 17) -------------------------------------------
def _fake_machine(monkeypatch, phys_bytes, gpu_free=None):
    import gds_kvcache.config.machine as machine  # where the default slab is sized

    monkeypatch.setattr(machine, "physical_memory", lambda: phys_bytes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_free is not None)
    if gpu_free is not None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=0: (gpu_free, 8 * gpu_free))


def test_physical_memory_reads_the_machine(monkeypatch):
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 2 * 1024 ** 2 if name == "SC_PHYS_PAGES" else (
        4096 if name == "SC_PAGE_SIZE" else real(name)))
    assert 0 < physical_memory() <= 8 * GB  # a cgroup limit may make it smaller still


def test_default_host_slab_is_bounded_by_physical_memory(monkeypatch):
    _fake_machine(monkeypatch, 8 * GB)
    c = CacheEngineConfig()
    assert c.slab_bytes <= GB and c.hot_bytes == c.slab_bytes  # 1/8 of 8 GiB; 5 GiB before the fix
    assert "max_local_cpu_size" in c.describe_defaults() and "physical memory" in \
        c.describe_defaults()["max_local_cpu_size"]
    assert CacheEngineConfig(memory_device="pinned").slab_bytes <= GB
    # Values the user sets are taken as given, and slab_size still wins.
    assert CacheEngineConfig(max_local_cpu_size=5).slab_bytes == 5 * GB
    assert CacheEngineConfig(max_local_cpu_size=5.0).cpu_bytes == 5 * GB
    assert CacheEngineConfig(slab_size=3).slab_bytes == 3 * GB
    assert CacheEngineConfig.from_env({"GDS_KVCACHE_MAX_LOCAL_CPU_SIZE": "5"}).slab_bytes == 5 * GB
    # The default survives replace() of other fields and a pickle round trip.
    assert CacheEngineConfig().replace(chunk_size=64).slab_bytes <= GB
    assert pickle.loads(pickle.dumps(CacheEngineConfig())).cpu_size_is_default


def test_default_on_a_big_machine_is_lmcache_5gb(monkeypatch):
    _fake_machine(monkeypatch, 1024 * GB)
    assert CacheEngineConfig().slab_bytes == 5 * GB


def test_default_cuda_slab_is_bounded_by_free_gpu_memory(monkeypatch):
    _fake_machine(monkeypatch, 1024 * GB, gpu_free=8 * GB)
    c = CacheEngineConfig()  # memory_device=auto -> cuda
    assert c.slab_bytes == 2 * GB and c.hot_bytes == 2 * GB
    d = c.describe_defaults()
    assert "cuda" in d["memory_device"] and "free on cuda:0" in d["max_local_cpu_size"]
    # A host slab on the same machine is bounded by RAM, not by the GPU.
    assert CacheEngineConfig(memory_device="host").slab_bytes == 5 * GB


# -- clear errors (issue 9 item 18) ------------------------------------------------------
def test_number_messages_read_as_english():
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig(chunk_size="abc")
    assert "allowed: an integer" in str(e.value) and "a int" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig(max_local_cpu_size="lots")
    assert "allowed: a number" in str(e.value) and "a float" not in str(e.value)


@pytest.mark.parametrize("value", ["file://", "file://   ", "", "  ", "a\x00b", b"/tmp"])
def test_empty_local_disk_names_the_field(value):
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig(local_disk=value, max_local_disk_size=1)
    assert e.value.field == "local_disk"


def test_yaml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("chunk_size: 128\nio_engine: [posix\n")
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_file(p)
    assert str(p) in str(e.value) and "line" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_missing_config_file_is_a_config_error(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_file(tmp_path / name)
    assert str(tmp_path) in str(e.value)


def test_config_file_with_odd_keys_or_bytes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("1: 2\nchunk_size: 64\n")
    with pytest.raises(ConfigError, match="chunk_size"):  # lists the known fields
        CacheEngineConfig.from_file(p)
    p.write_bytes(b"chunk_size: \xff\xfe\n")
    with pytest.raises(ConfigError):
        CacheEngineConfig.from_file(p)


def test_env_values_are_stripped_for_every_field(tmp_path):
    env = {"GDS_KVCACHE_IO_ENGINE": " posix\n", "GDS_KVCACHE_MEMORY_DEVICE": "host ",
           "GDS_KVCACHE_LOCAL_DISK": f"  {tmp_path}\t", "GDS_KVCACHE_MAX_LOCAL_DISK_SIZE": " 1 ",
           "GDS_KVCACHE_CHUNK_SIZE": " 64", "GDS_KVCACHE_DIRECT_IO": " off "}
    c = CacheEngineConfig.from_env(env)
    assert (c.io_engine, c.memory_device, c.local_disk, c.chunk_size, c.direct_io) == (
        "posix", "host", str(tmp_path), 64, False)


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_env({"GDS_KVCACHE_IO_THREADS": "abc"})
    assert e.value.field == "io_threads" and "GDS_KVCACHE_IO_THREADS" in str(e.value)


@pytest.mark.parametrize("kw,field", [
    (dict(kv_dtype="bfloat16"), "kv_dtype"), (dict(kv_dtype=None), "kv_dtype"),
    (dict(world_size=True), "world_size"), (dict(worker_id=False), "worker_id"), (dict(world_size=2.0), "world_size"),
    (dict(kv_shape=(32, 2, True, 8, 128)), "kv_shape"), (dict(kv_shape=(32, 2, 256, 8, 128.0)), "kv_shape"),
    (dict(kv_shape=5), "kv_shape"), (dict(model_name="m\ud800"), "model_name"), (dict(fmt="v\udcff"), "fmt"),
    (dict(model_name=b"m"), "model_name"),
])
def test_metadata_types_name_the_field(kw, field):
    base = dict(model_name="m", world_size=4, worker_id=0, fmt="vllm", kv_dtype=torch.bfloat16,
                kv_shape=(32, 2, 256, 8, 128))
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        CacheEngineMetadata(**base)
    assert e.value.field == field


def test_metadata_accepts_torch_size():
    md = CacheEngineMetadata("org/m", 2, 1, "vllm", torch.float16, torch.Size((4, 1, 16, 1, 64)))
    assert md.kv_shape == (4, 1, 16, 1, 64) and type(md.kv_shape) is tuple


@pytest.mark.gpu
def test_default_slab_on_a_real_gpu_fits_its_free_memory():
    free, _ = torch.cuda.mem_get_info(0)
    c = CacheEngineConfig()  # memory_device=auto -> cuda here
    assert "cuda" in c.describe_defaults()["memory_device"]
    assert 0 < c.slab_bytes <= max(free // 4, 64 * 2**20) and c.hot_bytes == c.slab_bytes
    assert CacheEngineConfig(memory_device="pinned").slab_bytes <= max(physical_memory() // 8, 64 * 2**20)


# -- shared-mode settings ----------------------------------------------------------------
SHARED_DEFAULTS = dict(writer_id=None, lease_ttl=5.0, claim_ttl=30.0, shared_tick=0.2, redis_socket_timeout=2.0,
                       redis_backoff=5.0)
SHARED_ENV = {"writer_id": "GDS_KVCACHE_WRITER_ID", "lease_ttl": "GDS_KVCACHE_LEASE_TTL",
              "claim_ttl": "GDS_KVCACHE_CLAIM_TTL", "shared_tick": "GDS_KVCACHE_SHARED_TICK",
              "redis_socket_timeout": "GDS_KVCACHE_REDIS_SOCKET_TIMEOUT", "redis_backoff": "GDS_KVCACHE_REDIS_BACKOFF"}


def test_shared_defaults():
    c = CacheEngineConfig()
    assert {k: getattr(c, k) for k in SHARED_DEFAULTS} == SHARED_DEFAULTS
    assert {k: getattr(CacheEngineConfig.from_env({}), k) for k in SHARED_DEFAULTS} == SHARED_DEFAULTS
    # Added after ``extra``: the existing fields keep their positions.
    assert [f.name for f in dataclasses.fields(CacheEngineConfig)][16:] == ["extra", *SHARED_DEFAULTS,
                                                                            "kvikio_staging", "use_layerwise"]


def test_shared_fields_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("writer_id: node-1.rank_0\nlease_ttl: 7.5\nclaim_ttl: 60\nshared_tick: 0.05\n"
                 "redis_socket_timeout: 0.5\nredis_backoff: 10\n")
    c = CacheEngineConfig.from_file(p)
    assert (c.writer_id, c.lease_ttl, c.claim_ttl, c.shared_tick, c.redis_socket_timeout, c.redis_backoff) == (
        "node-1.rank_0", 7.5, 60.0, 0.05, 0.5, 10.0)
    assert all(type(getattr(c, k)) is float for k in SHARED_DEFAULTS if k != "writer_id")
    p.write_text("writer_id: null\n")
    assert CacheEngineConfig.from_file(p).writer_id is None
    p.write_text("writer_id: 7\n")   # YAML reads it as an int: refused, with a hint to quote it
    with pytest.raises(ConfigError, match="quote") as e:
        CacheEngineConfig.from_file(p)
    assert e.value.field == "writer_id"
    p.write_text("writer_id: '7'\n")
    assert CacheEngineConfig.from_file(p).writer_id == "7"
    p.write_text("lease_ttl: 0\n")
    with pytest.raises(ConfigError, match="lease_ttl"):
        CacheEngineConfig.from_file(p)


@pytest.mark.parametrize("prefix", ["GDS_KVCACHE_", "LMCACHE_"])
def test_shared_fields_from_env(prefix):
    env = {prefix + "WRITER_ID": " w-1 ", prefix + "LEASE_TTL": "2.5", prefix + "CLAIM_TTL": " 45 ",
           prefix + "SHARED_TICK": "0.1", prefix + "REDIS_SOCKET_TIMEOUT": "600", prefix + "REDIS_BACKOFF": "3600"}
    c = CacheEngineConfig.from_env(env)
    assert (c.writer_id, c.lease_ttl, c.claim_ttl, c.shared_tick, c.redis_socket_timeout, c.redis_backoff) == (
        "w-1", 2.5, 45.0, 0.1, 600.0, 3600.0)
    for raw in ("none", "None", "", "  "):
        assert CacheEngineConfig.from_env({prefix + "WRITER_ID": raw}).writer_id is None


def test_shared_env_prefix_order():
    env = {"GDS_KVCACHE_LEASE_TTL": "3", "LMCACHE_LEASE_TTL": "4"}
    assert CacheEngineConfig.from_env(env).lease_ttl == 3.0


@pytest.mark.parametrize("field,value", [
    *[(f, v) for f in ("lease_ttl", "claim_ttl", "shared_tick")
      for v in (0, -1, 3600, 1e9, "abc", "", None, True, float("nan"), float("inf"), [1])],
    *[("redis_socket_timeout", v) for v in (0, -0.5, 600.001, 3600, "x", None, False, float("nan"))],
    *[("redis_backoff", v) for v in (0, -5, 3600.5, "soon", None, True, float("-inf"))],
    *[("writer_id", v) for v in ("", ".", "..", "a/b", "../x", "a b", "w\n", "x" * 65, "ü", 7, True, b"w", ["w"])],
])
def test_shared_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig(**{field: value})
    assert e.value.field == field
    assert field in str(e.value) and "allowed" in str(e.value)
    assert ("letters, digits" if field == "writer_id" else "seconds, more than 0") in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("lease_ttl", 3599.99), ("claim_ttl", 1e-3), ("shared_tick", "0.01"), ("redis_socket_timeout", 600),
    ("redis_backoff", 3600), ("writer_id", "x" * 64), ("writer_id", "A.b_c-9"), ("writer_id", "..."),
])
def test_shared_edge_values_are_accepted(field, value):
    c = CacheEngineConfig(**{field: value})
    assert getattr(c, field) == (value if field == "writer_id" else float(value))


@pytest.mark.parametrize("field,raw", [
    ("writer_id", "a/b"), ("lease_ttl", "0"), ("claim_ttl", "forever"), ("shared_tick", "3600"),
    ("redis_socket_timeout", "601"), ("redis_backoff", "-1"),
])
def test_shared_env_error_names_field_and_variable(field, raw):
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_env({SHARED_ENV[field]: raw})
    assert e.value.field == field and field in str(e.value) and SHARED_ENV[field] in str(e.value)


def test_lmcache_lookup_url_alias(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lookup_url: redis://h:6379/0\n")
    assert CacheEngineConfig.from_file(p).lookup_server_url == "redis://h:6379/0"
    assert CacheEngineConfig.from_dict({"lookup_url": "unix:///run/r.sock"}).lookup_server_url == "unix:///run/r.sock"
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_dict({"lookup_url": "redis://a", "lookup_server_url": "redis://b"})
    assert e.value.field == "lookup_url"
    assert CacheEngineConfig.from_env({"LMCACHE_LOOKUP_URL": " redis://h "}).lookup_server_url == "redis://h"
    assert CacheEngineConfig.from_env({"LMCACHE_LOOKUP_URL": "none"}).lookup_server_url is None
    # Our own name wins over LMCache's.
    assert CacheEngineConfig.from_env({"LMCACHE_LOOKUP_URL": "redis://a",
                                       "GDS_KVCACHE_LOOKUP_SERVER_URL": "redis://b"}).lookup_server_url == "redis://b"
    with pytest.raises(ConfigError) as e:
        CacheEngineConfig.from_env({"GDS_KVCACHE_LOOKUP_URL": "http://h"})
    assert e.value.field == "lookup_server_url" and "GDS_KVCACHE_LOOKUP_URL" in str(e.value)


def test_shared_fields_survive_replace_and_pickle():
    c = CacheEngineConfig(writer_id="w", lease_ttl=9, redis_backoff=1)
    assert pickle.loads(pickle.dumps(c)) == c
    d = c.replace(chunk_size=64)
    assert (d.writer_id, d.lease_ttl, d.redis_backoff) == ("w", 9.0, 1.0)
    with pytest.raises(ConfigError, match="claim_ttl"):
        c.replace(claim_ttl=0)


def test_kvikio_staging_values():
    assert CacheEngineConfig().kvikio_staging == "pipelined"
    assert CacheEngineConfig(kvikio_staging=" kvikio ").kvikio_staging == "kvikio"
    assert CacheEngineConfig.from_env({"GDS_KVCACHE_KVIKIO_STAGING": "kvikio"}).kvikio_staging == "kvikio"
    for bad in ("bounce", "", None, 1):
        with pytest.raises(ConfigError, match=r"kvikio_staging.*pipelined \| kvikio"):
            CacheEngineConfig(kvikio_staging=bad)
