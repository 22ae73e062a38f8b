"""checksum_batch: many spans of one buffer, each bit-identical to checksum_host of its slice (issue 10)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gds_kvcache.errors import ShapeMismatchError
from gds_kvcache.kernels import checksum, checksum_batch, checksum_host
from gds_kvcache.units import MiB

from .helpers import random_tensor

ck = importlib.import_module("gds_kvcache.kernels.checksum")  # the package's `checksum` is the function


def random_spans(rng, size: int, n_small: int, big: int):
    """4 KiB-aligned spans of 1 byte .. 3 MiB (odd sizes included), many small ones and one ``big``."""
    spans = [(0, big)]
    off = -(-big // 4096) * 4096
    sizes = [1, 7, 8, 9, 4095, 4097, 3 * MiB, 3 * MiB - 1, MiB + 3]
    sizes += [int(x) for x in rng.integers(1, 64 << 10, n_small)]
    sizes += [int(x) for x in rng.integers(1, 3 * MiB + 1, 4)]
    for n in sizes:
        spans.append((off, n))
        off += -(-n // 4096) * 4096
    assert off <= size
    order = rng.permutation(len(spans))  # any order
    return [spans[i] for i in order]


def per_span(buf: np.ndarray, spans):
    return [checksum_host(buf[o:o + n]) for o, n in spans]


def test_batch_equals_checksum_host_per_span(rng):
    buf = random_tensor((64 * MiB,), torch.uint8)
    spans = random_spans(rng, buf.numel(), 200, 16 * MiB + 5)
    got = checksum_batch(buf, spans)
    assert got == per_span(buf.numpy(), spans)
    assert all(isinstance(v, int) and 0 <= v < 2**64 for v in got)
    # The single-span call keeps its results.
    assert [checksum(buf[o:o + n]) for o, n in spans[:20]] == got[:20]


def test_batch_on_pinned_style_and_numpy_buffers(rng):
    buf = random_tensor((3 * MiB,), torch.uint8)
    spans = [(0, MiB), (MiB, 1), (MiB + 4096, 12345)]
    want = per_span(buf.numpy(), spans)
    assert checksum_batch(buf.numpy(), spans) == want
    assert checksum_batch(buf, spans) == want


def test_batch_misaligned_spans_and_buffer(rng):
    # Offsets that are not 8-byte aligned, on a buffer whose start is not aligned either.
    base = random_tensor((1 * MiB + 64,), torch.uint8)
    for shift in (0, 1, 3, 7):
        buf = base[shift:]
        spans = [(int(o), int(n)) for o, n in zip(rng.integers(0, 512 << 10, 60), rng.integers(1, 300 << 10, 60))]
        spans += [(1, 1), (2, 8), (5, 17), (buf.numel() - 9, 9), (0, buf.numel())]
        assert checksum_batch(buf, spans) == per_span(buf.numpy(), spans)


def test_batch_detects_a_flipped_bit_in_its_span_only(rng):
    buf = random_tensor((2 * MiB,), torch.uint8)
    spans = [(i * 64 * 1024, 64 * 1024 - (i % 3)) for i in range(32)]
    before = checksum_batch(buf, spans)
    buf[5 * 64 * 1024 + 777] ^= 16
    after = checksum_batch(buf, spans)
    assert [i for i in range(32) if before[i] != after[i]] == [5]


def test_batch_is_one_compiled_call_on_the_cpu(monkeypatch, rng):
    calls = []
    cpu = importlib.import_module("gds_kvcache.kernels.checksum_cpu")
    real = cpu.checksum_batch_words

    def spy(*a):
        calls.append(a[2].shape[0])
        return real(*a)

    monkeypatch.setattr(cpu, "checksum_batch_words", spy)
    buf = random_tensor((4 * MiB,), torch.uint8)
    spans = [(i * 4096, 4096 - i % 5) for i in range(1000)]
    assert checksum_batch(buf, spans) == per_span(buf.numpy(), spans)
    assert calls == [1000]


def test_batch_empty_and_bad_arguments():
    buf = random_tensor((8192,), torch.uint8)
    assert checksum_batch(buf, []) == []
    for bad in ([(0, 0)], [(-1, 4)], [(8000, 193)], [(0, 8193)]):
        with pytest.raises(ShapeMismatchError, match="span 0"):
            checksum_batch(buf, bad)
    with pytest.raises(ShapeMismatchError, match="pairs"):
        checksum_batch(buf, [(0, 2, 3), (4, 5, 6)])
    with pytest.raises(ShapeMismatchError, match="1-D uint8"):
        checksum_batch(buf.view(torch.int16), [(0, 2)])
    with pytest.raises(ShapeMismatchError, match="1-D uint8"):
        checksum_batch(buf.view(2, 4096), [(0, 2)])
    with pytest.raises(ShapeMismatchError, match="1-D uint8"):
        checksum_batch(buf[::2], [(0, 2)])


def test_batch_kernel_under_the_numba_cuda_simulator():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "tests.sim_checksum_batch"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SIMULATOR OK" in r.stdout


def test_tiles_balance_one_big_span_against_many_small():
    # Host-side descriptor math of the GPU kernel: a 32 MiB span next to 64 KiB
    # ones is cut into many tiles, every span has at least one, and tiles are equal.
    kc = ck._gpu_module()
    lens = np.array([32 * MiB] + [64 << 10] * 100 + [3], dtype=np.int64)
    woffs = np.cumsum(np.concatenate([[0], lens[:-1]])) // 8
    desc, tile, ntiles = kc.batch_descriptors(woffs, lens)
    n = lens.shape[0]
    tiles = np.diff(desc[:n + 1])
    assert (tiles >= 1).all() and tiles[0] >= 256 and ntiles == desc[n]
    assert (tiles * tile >= lens // 8).all() and ((tiles - 1) * tile < np.maximum(lens // 8, 1)).all()
    assert (desc[n + 1:2 * n + 1] == woffs).all() and (desc[2 * n + 1:3 * n + 1] == lens).all()
    assert (desc[3 * n + 1:] == 0).all()


def test_package_checksum_cuda_stays_the_function_after_gpu_module_import():
    # Importing kernels/checksum_cuda.py (first GPU checksum) used to rebind the package's
    # exported checksum_cuda function to that module. Fresh interpreter: the import must be the first.
    code = ("import sys, inspect, gds_kvcache.kernels as k\n"
            "sys.modules['gds_kvcache.kernels.checksum']._use_numba_gpu()\n"
            "assert 'gds_kvcache.kernels.checksum_cuda' in sys.modules\n"
            "assert inspect.isfunction(k.checksum_cuda), k.checksum_cuda\n"
            "import torch\n"
            "t = torch.randint(0, 256, (1001,), dtype=torch.uint8)\n"
            "assert k.checksum_cuda(t) == k.checksum_host(t.numpy())\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_bench_checksum_script_smoke(tmp_path):
    import json

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_checksum.py"), "--smoke", "--out", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_checksum.json").read_text())["rows"]
    assert [x["batch"] for x in rows][:3] == ["64 x 64 KiB", "64 x 1 MiB", "8 x 16 MiB"]
    assert all(x["exact"] is True and x["batch GB/s"] > 0 for x in rows)


# --- real GPU -----------------------------------------------------------------

gpu = pytest.mark.gpu


def _gpu_spans(rng, size):
    return random_spans(rng, size, 100, 32 * MiB)


@gpu
@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_gpu_batch_equals_host(monkeypatch, rng, impl):
    monkeypatch.setattr(ck, "_NUMBA_GPU", impl == "numba")
    buf = random_tensor((96 * MiB,), torch.uint8, "cuda")
    spans = _gpu_spans(rng, buf.numel())
    host = buf.cpu().numpy()
    assert checksum_batch(buf, spans) == per_span(host, spans)
    # Misaligned spans and buffer start: those spans fall back one by one, results unchanged.
    sub = buf[3:]
    odd = [(1, 100), (5, 4096), (0, 8), (13, MiB + 1)] + [(4093, 65536), (8189, 3)]
    assert checksum_batch(sub, odd) == per_span(host[3:], odd)


@gpu
def test_gpu_batch_one_launch_and_64_x_1mib(monkeypatch, rng):
    from gds_kvcache.kernels.launch import prepared_launch_available

    if not prepared_launch_available():
        pytest.skip("numba-cuda without the prepared launch: the batch falls back to torch ops per span")
    kc = ck._gpu_module()
    launches = []
    real = kc.prepared

    def counting(dispatcher, device, example, tag=None):
        k = real(dispatcher, device, example, tag)

        def launch(*a):
            launches.append(dispatcher)
            return k(*a)
        return launch

    monkeypatch.setattr(kc, "prepared", counting)
    monkeypatch.setattr(ck, "_checksum_torch", None)  # no per-span fallback may run
    buf = random_tensor((64 * MiB,), torch.uint8, "cuda")
    spans = [(i * MiB, MiB) for i in range(64)]
    got = checksum_batch(buf, spans)
    assert launches == [kc.checksum_batch_cuda]
    assert got == per_span(buf.cpu().numpy(), spans)
    buf[7 * MiB + 12345] ^= 1
    changed = checksum_batch(buf, spans)
    assert [i for i in range(64) if changed[i] != got[i]] == [7]


@gpu
def test_gpu_batch_from_16_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    bufs = [random_tensor((32 * MiB + 4096 * i,), torch.uint8, "cuda") for i in range(16)]
    spans = [random_spans(np.random.default_rng(i), b.numel(), 30, 2 * MiB + i) for i, b in enumerate(bufs)]
    want = [per_span(b.cpu().numpy(), s) for b, s in zip(bufs, spans)]
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            assert list(pool.map(checksum_batch, bufs, spans)) == want


@gpu
def test_gpu_batch_orders_after_the_current_stream(rng):
    # ordered=True (the default): a producer still writing on the current stream is waited for.
    buf = torch.empty(16 * MiB, dtype=torch.uint8, device="cuda")
    src = random_tensor((16 * MiB,), torch.uint8, "cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    buf.copy_(src)
    spans = [(i * MiB, MiB - i) for i in range(16)]
    assert checksum_batch(buf, spans) == per_span(src.cpu().numpy(), spans)


@gpu
def test_gpu_batch_on_pinned_memory(rng):
    buf = random_tensor((4 * MiB,), torch.uint8).pin_memory()
    spans = [(i * 65536, 65536 - i) for i in range(64)]
    assert checksum_batch(buf, spans) == per_span(buf.numpy(), spans)
