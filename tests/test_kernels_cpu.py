import pytest
import torch

from gds_kvcache import ShapeMismatchError
from gds_kvcache.kernels import LAYOUTS, checksum, checksum_host, describe, pack

from .check_kernels import DTYPES, check_case
from .helpers import random_tensor


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nt,negative", [(36, False), (13, True), (1, False)])
def test_cpu_kernels_match_torch_indexing(layout, dtype, nt, negative):
    check_case(layout, dtype, nt, negative, seed=nt)


@pytest.mark.parametrize("layout", ["vllm", "mla"])
def test_odd_rows_fall_back_to_narrow_words(layout):
    check_case(layout, torch.int8, 11, True, dims=(2, 5, 3, 1, 7))   # 7-byte rows: byte copies
    check_case(layout, torch.float16, 11, False, dims=(2, 5, 3, 1, 3))  # 6-byte rows: 2-byte words


def test_bad_arguments():
    kv = [random_tensor((2, 4, 4, 2, 8), torch.bfloat16) for _ in range(2)]
    with pytest.raises(ShapeMismatchError, match="needs"):
        pack(kv, "vllm", torch.arange(4), torch.empty(2, 2, 5, 16, dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatchError, match="out of range"):
        pack(kv, "vllm", torch.tensor([0, 99]), torch.empty(2, 2, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatchError, match="layout"):
        describe("paged", kv)
    with pytest.raises(ShapeMismatchError, match="contiguous"):
        describe("vllm", [t.transpose(3, 4) for t in kv])
    with pytest.raises(ShapeMismatchError, match="differs"):
        describe("vllm", [kv[0], kv[1].float()])
    with pytest.raises(ShapeMismatchError, match="integer"):
        pack(kv, "vllm", torch.tensor([0.5]), torch.empty(2, 2, 1, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096, 100_003, 3 << 20])
def test_checksum_detects_any_single_change(n):
    t = random_tensor((n,), torch.uint8)
    c = checksum(t)
    assert c == checksum_host(t.numpy().tobytes()) and 0 <= c < 2**64
    for pos in {0, n // 2, n - 1}:
        u = t.clone()
        u[pos] ^= 1 << (pos % 8)
        assert checksum(u) != c
    if n > 1:
        assert checksum(t[:-1]) != c  # truncation
        z = torch.cat([t[:-1], torch.zeros(1, dtype=torch.uint8)])
        if not torch.equal(z, t):
            assert checksum(z) != c


def test_torch_checksum_path_equals_host_kernel():
    # The GPU path is torch int64 ops; on CPU tensors the same ops must give the same bits.
    from gds_kvcache.kernels import checksum_cuda

    for n in (1, 7, 8, 9, 4096, 100_003, 5 << 20):
        t = random_tensor((n,), torch.uint8)
        assert checksum_cuda(t) == checksum_host(t.numpy())
