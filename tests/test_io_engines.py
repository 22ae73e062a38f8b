import os

import pytest
import torch

from gds_kvcache.config import CacheEngineConfig
from gds_kvcache.io import KvikIOEngine, PosixEngine, choose_engine, open_engine
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
        assert rep.engine == engine_name and rep.path in ("posix", "kvikio-compat", "gds")
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
    from gds_kvcache.errors import IOEngineError

    path = _file(tmp_path, PAGE)
    a = SlabMemoryAllocator(MiB, "host")
    o = a.allocate((2 * PAGE,), torch.uint8)
    with ENGINE_CLS[engine_name](path, 2, 64 * 1024, False) as eng:
        with pytest.raises((IOEngineError, OSError, RuntimeError)):
            eng.read(o, 0, 2 * PAGE)


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
