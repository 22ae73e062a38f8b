"""GPU tests: run on the device machine (skipped without CUDA)."""

import importlib

import pytest
import torch

from gds_kvcache import CacheEngineConfig, CacheEngineKey, StorageManager
from gds_kvcache.kernels import LAYOUTS, checksum, checksum_host
from gds_kvcache.units import GB, MiB

from .check_kernels import DTYPES, check_case
from .conftest import require_kvikio
from .helpers import random_tensor, run_threads, same_bytes
from .test_engine import run_e2e

pytestmark = pytest.mark.gpu



@pytest.mark.parametrize("engine", ["kvikio", "posix"])
def test_gpu_slab_1gib_round_trip(tmp_path, engine):
    if engine == "kvikio":
        require_kvikio()
    chunk = 64 * MiB
    n = 17  # > 1 GiB
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "kv"), max_local_disk_size=(n + 2) * chunk / GB,
                            local_cpu=False, slab_size=(n + 2) * chunk / GB, memory_device="cuda",
                            io_engine=engine, io_threads=16)
    keys = [CacheEngineKey("t", "m", 1, 0, i + 1) for i in range(n)]
    refs = []
    with StorageManager(cfg) as sm:
        assert sm.allocator.device.type == "cuda"
        assert sm.io_report().engine == engine
        futs = []
        for k in keys:
            o = sm.allocate((chunk // 2 - 3,), torch.bfloat16)
            o.tensor.view(torch.int16).copy_(torch.randint(-32768, 32767, o.shape, dtype=torch.int16, device="cuda"))
            refs.append(checksum(o.tensor))
            futs.append(sm.put(k, o))
        for f in futs:
            f.result()
    with StorageManager(cfg) as sm:
        total = 0
        for k, ref in zip(keys, refs):
            g = sm.get(k)
            assert g is not None and g.device.type == "cuda"
            host = g.tensor.cpu()
            assert checksum(g.tensor) == ref == checksum_host(host.view(torch.uint8).numpy())
            total += g.nbytes
            g.ref_count_down()
        assert total >= GB
        sm.memcheck()


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_gpu_checksum_matches_host(monkeypatch, impl):
    mod = importlib.import_module("gds_kvcache.kernels.checksum")  # the package's `checksum` is the function
    monkeypatch.setattr(mod, "_NUMBA_GPU", impl == "numba")
    for n in (1, 7, 8, 4097, 10_000_019, 64 << 20):
        t = random_tensor((n,), torch.uint8, "cuda")
        assert checksum(t) == checksum_host(t.cpu().numpy())
        u = t.clone()
        u[n // 3] ^= 4
        assert checksum(u) != checksum(t)
        # A misaligned view takes the torch path whatever the setting.
        if n > 9:
            assert checksum(t[1:]) == checksum_host(t[1:].cpu().numpy())


def test_gpu_checksum_uses_the_kernel_with_prepared_launch():
    from gds_kvcache.kernels.launch import prepared_launch_available

    mod = importlib.import_module("gds_kvcache.kernels.checksum")

    if not prepared_launch_available():
        pytest.skip("numba-cuda without the prepared launch: torch ops are the faster choice")
    checksum(random_tensor((4096,), torch.uint8, "cuda"))
    assert mod._NUMBA_GPU is True


def test_gpu_checksum_from_many_threads():
    # I/O threads checksum concurrently, each on its own stream and result buffer.
    from concurrent.futures import ThreadPoolExecutor

    ts = [random_tensor((1 << 20 | 3 * i,), torch.uint8, "cuda") for i in range(32)]
    want = [checksum_host(t.cpu().numpy()) for t in ts]
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            assert list(pool.map(checksum, ts)) == want


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nt,negative", [(36, False), (13, True)])
def test_gpu_kernels_match_torch_indexing(layout, dtype, nt, negative):
    check_case(layout, dtype, nt, negative, device="cuda", seed=nt)


@pytest.mark.parametrize("layout", ["vllm", "cross_layer"])
def test_gpu_kernels_large(layout):
    check_case(layout, torch.bfloat16, 1000, True, device="cuda", dims=(4, 300, 16, 8, 128), seed=5)


@pytest.mark.parametrize("max_grid", [None, 37])
@pytest.mark.parametrize("layout", ["vllm", "flashinfer", "mla"])
def test_gpu_kernels_llama_scale(monkeypatch, layout, max_grid):
    # 32 layers x 4000 tokens; with a 37-block grid cap every warp loops over many rows.
    from gds_kvcache.kernels import paged_cuda

    if max_grid is not None:
        monkeypatch.setattr(paged_cuda, "MAX_GRID", max_grid)
    check_case(layout, torch.bfloat16, 4000, True, device="cuda", dims=(32, 300, 16, 8, 128), seed=6)


def test_gpu_prepared_launch_in_use():
    from numba.cuda import dispatcher

    from gds_kvcache.kernels import launch_path

    try:
        from cuda.core import launch
    except ImportError:
        pytest.skip("numba-cuda without cuda.core")
    if getattr(dispatcher, "launch", None) is not launch:
        pytest.skip("this numba-cuda does not launch through cuda.core")
    assert launch_path() == "prepared"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_numba_launch_fallback_same_bytes(monkeypatch, layout):
    from gds_kvcache.kernels import paged

    for w in (1, 2, 4, 8):
        monkeypatch.setattr(paged._cuda_kernel(w), "path", "numba-launch")
    for dtype in (torch.bfloat16, torch.int8, torch.float32):
        check_case(layout, dtype, 29, True, device="cuda", seed=11)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("engine", ["kvikio", "posix"])
def test_gpu_engine_end_to_end(tmp_path, layout, engine):
    if engine == "kvikio":
        require_kvikio()
    run_e2e(tmp_path, layout, device="cuda", engine=engine)


def test_gpu_posix_staging_same_bytes_as_kvikio(tmp_path):
    require_kvikio()
    cfg = dict(local_disk=str(tmp_path / "kv"), max_local_disk_size=0.25, local_cpu=False, slab_size=0.25,
               memory_device="cuda")
    k = CacheEngineKey("t", "m", 1, 0, 7)
    with StorageManager(CacheEngineConfig(io_engine="posix", **cfg)) as sm:
        o = sm.allocate((3, 1000, 333), torch.float16)
        o.tensor.view(torch.int16).copy_(torch.randint(-32768, 32767, o.shape, dtype=torch.int16, device="cuda"))
        ref = o.tensor.clone()
        sm.put(k, o).result()
    with StorageManager(CacheEngineConfig(io_engine="kvikio", **cfg)) as sm:
        g = sm.get(k)
        assert same_bytes(g.tensor, ref)
        g.ref_count_down()


@pytest.mark.parametrize("engine", ["kvikio", "posix"])
def test_gpu_slab_races(tmp_path, engine):
    """Threads put/get/prefetch/remove overlapping keys through a GPU slab under a tight pool."""
    import random
    import time

    from gds_kvcache import LocalDiskBackend, SlabMemoryAllocator

    from .reliability_common import chunk_data, record, rkey, settle_put

    if engine == "kvikio":
        require_kvikio()
    cfg = CacheEngineConfig(local_disk=str(tmp_path / "g"), max_local_disk_size=3 * MiB / GB, io_engine=engine,
                            io_threads=8, memory_device="cuda")
    alloc = SlabMemoryAllocator(64 * MiB, "cuda")
    be = LocalDiskBackend(cfg, None, alloc)
    refs = {i: chunk_data(i) for i in range(30)}
    stop = time.monotonic() + 8
    errors, wrong, checked = [], [0], [0]

    def worker(seed):
        rnd = random.Random(seed)
        try:
            while time.monotonic() < stop:
                i = rnd.randrange(30)
                r = rnd.random()
                if r < 0.4:
                    o = alloc.allocate(refs[i].shape, torch.uint8)
                    if o is None:
                        continue
                    o.tensor.copy_(refs[i].to("cuda", non_blocking=False))
                    f = be.submit_put_task(rkey(i), o)
                    o.ref_count_down()
                    settle_put(f)
                elif r < 0.9:
                    g = be.get_blocking(rkey(i))
                    if g is not None:
                        wrong[0] += int((g.tensor.cpu() != refs[i]).sum())
                        checked[0] += 1
                        g.ref_count_down()
                else:
                    be.remove(rkey(i))
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    ts = run_threads(worker, 6)
    assert not any(t.is_alive() for t in ts) and errors == [] and wrong[0] == 0
    be.wait_for_puts(30)
    be.memcheck()
    be.close()
    alloc.memcheck()
    assert alloc.used == 0
    record(f"races with the GPU slab ({engine} engine, device)", "6 threads, 8 s, 30 keys, 3 MiB pool, "
           "GPU checksums", 6, checked[0], wrong[0], 0)


def test_gpu_kernels_and_checksum_on_a_second_gpu():
    # Compiled kernels are loaded per device context: each GPU gets its own launcher.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for dev in ("cuda:1", "cuda:0"):  # cuda:1 first, while cuda:0 is the current device
        for layout in ("vllm", "mla"):
            check_case(layout, torch.bfloat16, 29, True, device=dev, seed=12)
        t = random_tensor((1 << 20,), torch.uint8, dev)
        assert checksum(t) == checksum_host(t.cpu().numpy())


def test_gpu_offsets_dropped_while_a_kernel_reads_them():
    """The per-layer offsets tensor is made on one stream, read by a pack queued on another behind a
    long sleep, and dropped from the kernels' cache before that pack runs; the memory is then asked
    for again on the first stream and zeroed. The pack must still read the right offsets."""
    from gds_kvcache.kernels import paged

    from .kernel_cases import make_cache, ref_rows

    kv = make_cache("vllm", 8, 64, 16, 8, 128, torch.bfloat16, device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:512]
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    paged._OFFSETS.clear()
    with torch.cuda.stream(a):              # the offsets are made (and cached) on stream a
        paged.pack(kv, "vllm", slots, torch.empty((2, 8, 512, 8 * 128), dtype=torch.bfloat16, device="cuda"))
    a.synchronize()
    out = torch.empty((2, 8, 512, 8 * 128), dtype=torch.bfloat16, device="cuda")
    b.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(b):
        torch.cuda._sleep(200_000_000)      # the pack below runs well after the code that follows
        paged.pack(kv, "vllm", slots, out, check=False)
    paged._OFFSETS.clear()                  # what an eviction does
    with torch.cuda.stream(a):
        junk = [torch.zeros(8, dtype=torch.int64, device="cuda") for _ in range(64)]
    b.synchronize()
    a.synchronize()
    del junk
    assert same_bytes(out, ref_rows("vllm", kv, slots))
