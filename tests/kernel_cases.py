"""Paged-KV cases and a torch-indexing reference, shared by CPU, simulator and GPU tests."""

import torch

from .helpers import random_tensor


def make_cache(layout, L, nb, bs, h, d, dtype, device="cpu", one_allocation=False):
    """Random paged cache. ``one_allocation`` keeps all layers in one buffer (Numba's
    CUDA simulator copies whole host arrays back after a launch, so layers must not
    straddle foreign memory there)."""
    per = {"vllm": (2, nb, bs, h, d), "flashinfer": (nb, 2, bs, h, d), "mla": (nb, bs, d)}
    if layout == "cross_layer":
        return random_tensor((nb, L, 2, bs, h, d), dtype, device)
    if one_allocation:
        return list(random_tensor((L,) + per[layout], dtype, device).unbind(0))
    return [random_tensor(per[layout], dtype, device) for _ in range(L)]


def zeros_like_cache(layout, kv):
    if layout == "cross_layer":
        return torch.zeros_like(kv)
    if isinstance(kv, list) and len(kv) > 1 and kv[0].untyped_storage().data_ptr() == \
            kv[1].untyped_storage().data_ptr():
        return list(torch.zeros((len(kv),) + tuple(kv[0].shape), dtype=kv[0].dtype, device=kv[0].device).unbind(0))
    return [torch.zeros_like(t) for t in kv]


def ref_rows(layout, kv, slots):
    """``[K, L, T, row]`` gathered with plain torch indexing (negative slots -> zeros)."""
    slots = torch.as_tensor(slots, device=(kv if isinstance(kv, torch.Tensor) else kv[0]).device)
    valid = slots >= 0
    idx = slots.clamp(min=0)
    if layout == "cross_layer":
        nb, L, _, bs, h, d = kv.shape
        flat = kv.permute(2, 1, 0, 3, 4, 5).reshape(2, L, nb * bs, h * d)
        out = flat[:, :, idx]
    else:
        rows = []
        for t in kv:
            if layout == "vllm":
                f = t.reshape(2, -1, t.shape[3] * t.shape[4])
            elif layout == "flashinfer":
                f = t.permute(1, 0, 2, 3, 4).reshape(2, -1, t.shape[3] * t.shape[4])
            else:
                f = t.reshape(1, -1, t.shape[2])
            rows.append(f[:, idx])
        out = torch.stack(rows, 1)
    # Mask in bytes so every dtype (fp8 included) takes the same path.
    raw = out.contiguous().view(torch.uint8)
    return torch.where(valid.view(1, 1, -1, 1), raw, torch.zeros((), dtype=torch.uint8, device=raw.device)).view(
        out.dtype)
