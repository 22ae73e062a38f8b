import os

import pytest
import torch

from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.errors import ClosedError, IOEngineError
from gds_kvcache.io import PATHS, KvikIOEngine, PosixEngine, choose_engine, open_engine
from gds_kvcache.memory import SlabMemoryAllocator
from gds_kvcache.units import MiB, PAGE

from .conftest import require_kvikio
from .helpers import random_tensor

ENGINE_CLS = {"posix": PosixEngine, "kvikio": KvikIOEngine}


def _file(tmp_path, size):
    p = tmp_path / "pool"
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("nbytes", [1, 4095, 4097, 3 * MiB + 17])
def test_round_trip(tmp_path, engine_name, direct, nbytes):
    path = _file(tmp_path, 8 * MiB)
    a = SlabMemoryAllocator(16 * MiB, "host")
    src = a.allocate((nbytes,), torch.uint8)
    src.tensor.copy_(random_tensor((nbytes,), torch.uint8))
    dst = a.allocate((nbytes,), torch.uint8)
    dst.tensor.copy_(random_tensor((nbytes,), torch.uint8))
    with ENGINE_CLS[engine_name](path, 4, 1 * MiB, direct) as eng:
        assert eng.write(src, PAGE, src.phys_size) == src.phys_size
        fut = eng.submit_read(dst, PAGE, dst.phys_size)
        assert fut.result() == dst.phys_size
        rep = eng.report()
        assert rep.engine == engine_name and rep.path in PATHS
        if not direct:
            assert not rep.direct_io and rep.direct_io_reason == "disabled in config"
    assert torch.equal(src.tensor, dst.tensor)
    with open(path, "rb") as f:
        f.seek(PAGE)
        assert f.read(nbytes) == src.tensor.numpy().tobytes()


def test_one_engine_reads_what_the_other_wrote(tmp_path):
    require_kvikio()
    path = _file(tmp_path, 4 * MiB)
    a = SlabMemoryAllocator(8 * MiB, "host")
    objs = [a.allocate((MiB - 100,), torch.uint8) for _ in range(4)]
    for o in objs:
        o.tensor.copy_(random_tensor(o.shape, torch.uint8))
    with PosixEngine(path, 2, 256 * 1024, True) as pe, KvikIOEngine(path, 2, 256 * 1024, True) as ke:
        pe.write(objs[0], 0, objs[0].phys_size)
        ke.write(objs[1], MiB, objs[1].phys_size)
        ke.read(objs[2], 0, objs[2].phys_size)
        pe.read(objs[3], MiB, objs[3].phys_size)
    assert torch.equal(objs[0].tensor, objs[2].tensor)
    assert torch.equal(objs[1].tensor, objs[3].tensor)


def test_short_file_is_an_error(tmp_path, engine_name):
    path = _file(tmp_path, PAGE)
    a = SlabMemoryAllocator(MiB, "host")
    o = a.allocate((2 * PAGE,), torch.uint8)
    with ENGINE_CLS[engine_name](path, 2, 64 * 1024, False) as eng:
        # The library's own error, never KvikIO's bare RuntimeError.
        with pytest.raises(IOEngineError, match="short read"):
            eng.read(o, 0, 2 * PAGE)
        with pytest.raises(IOEngineError, match="short read"):
            eng.submit_read(o, 0, 2 * PAGE).result()


def test_one_object_calls_after_close(tmp_path, engine_name):
    a = SlabMemoryAllocator(MiB, "host")
    o = a.allocate((PAGE,), torch.uint8)
    eng = ENGINE_CLS[engine_name](_file(tmp_path, MiB), 2, 64 * 1024, False)
    eng.write(o, 0, PAGE)
    eng.close()
    for call in (eng.read, eng.write, eng.submit_read, eng.submit_write):
        with pytest.raises(ClosedError):
            call(o, 0, PAGE)


def test_choose_engine_reports_why(monkeypatch):
    import gds_kvcache.io.select as sel

    assert choose_engine("posix") == ("posix", "requested in config")
    monkeypatch.setattr(sel, "kvikio_error", lambda: "libcuda.so.1 not loadable (test)")
    name, why = choose_engine("auto")
    assert name == "posix" and "libcuda" in why
    from gds_kvcache.errors import IOEngineError

    with pytest.raises(IOEngineError, match="libcuda"):
        choose_engine("kvikio")


def test_open_engine_auto(tmp_path):
    cfg = CacheEngineConfig(io_threads=2)
    with open_engine(_file(tmp_path, MiB), cfg, "host") as eng:
        assert eng.report().engine == choose_engine("auto")[0]
        assert "engine=" in eng.report().line()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["kvikio", "posix"])
def test_gpu_round_trip(tmp_path, name):
    if name == "kvikio":
        require_kvikio()
    path = _file(tmp_path, 64 * MiB)
    a = SlabMemoryAllocator(128 * MiB, "cuda")
    src = a.allocate((40 * MiB + 3,), torch.uint8)
    src.tensor.copy_(random_tensor(src.shape, torch.uint8, "cuda"))
    dst = a.allocate((40 * MiB + 3,), torch.uint8)
    with ENGINE_CLS[name](path, 8, 4 * MiB, True, "cuda") as eng:
        eng.write(src, 0, src.phys_size)
        eng.read(dst, 0, dst.phys_size)
    assert torch.equal(src.tensor, dst.tensor)
    assert os.path.getsize(path) == 64 * MiB


def test_info_free_space_and_budget(tmp_path, capsys):
    from gds_kvcache.bench.info import collect, main
    from gds_kvcache.io import fs_type

    r = collect(str(tmp_path), CacheEngineConfig(io_threads=2), disk_gb=1e6)
    assert r["file_system"] == fs_type(str(tmp_path)) and 0 < r["free_bytes"] <= r["total_bytes"]
    assert r["disk_budget_bytes"] > r["free_bytes"] and "exceeds the free space" in r["warnings"][0]
    assert r["io_path"] in PATHS and r["io_path_reason"]
    assert collect(str(tmp_path), CacheEngineConfig(io_threads=2), disk_gb=0.001)["warnings"] == []
    assert main(["--dir", str(tmp_path), "--disk-gb", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "free space" in out and "WARNING" in out and "exceeds the free space" in out
    # The machine-sized defaults, where the config can describe them.
    if hasattr(CacheEngineConfig, "describe_defaults"):
        assert "default slab_size" in out
