"""The slot mapping a caller hands the engine: converted, checked, and how many leading tokens have a slot.

``slot_mapping`` is a 1-D integer tensor (CPU or CUDA), NumPy array or list
with one slot per token; a negative slot (vLLM pads with -1) means the token
has no KV in the paged cache. Invariant: anything else raises
``ShapeMismatchError`` naming what is allowed, before any work starts; a
mapping is checked with one device-to-host transfer. The tensor returned may
be the caller's own (or share a NumPy array's memory): a user that reads it
later, after the call returned, must copy it.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ShapeMismatchError

__all__ = ["checked_slots", "slot_tensor"]


def checked_slots(slot_mapping, n: int, device: torch.device, num_slots: int) -> tuple[torch.Tensor, int]:
    """The mapping as int64 on ``device``, and how many of its first ``n`` slots lead with a slot (>= 0).

    Raises ``ShapeMismatchError`` for fewer than ``n`` slots or a slot past
    ``num_slots``; one device-to-host transfer.
    """
    slots = slot_tensor(slot_mapping)
    if slots.numel() < n:
        raise ShapeMismatchError(f"slot_mapping needs one slot per token ({n}), got {slots.numel()}")
    slots = slots.to(device=device, dtype=torch.int64)
    if n == 0:
        return slots, 0
    head = slots[:n]
    # Leading slots >= 0 (a running product of "valid" is 1 until the
    # first -1) and the largest slot, read back together.
    valid, top = torch.stack(((head >= 0).to(torch.int64).cumprod(0).sum(), head.max())).tolist()
    if top >= num_slots:
        raise ShapeMismatchError(f"slot_mapping holds slot {top}, past the cache's {num_slots} slots "
                                 f"(allowed: 0..{num_slots - 1}, or negative for no slot)")
    return slots, valid


def slot_tensor(slot_mapping) -> torch.Tensor:
    """``slot_mapping`` as a 1-D integer tensor on its own device, or ``ShapeMismatchError`` saying why not."""
    allowed = "allowed: a 1-D integer tensor (CPU or CUDA), integer NumPy array or list of ints"
    if isinstance(slot_mapping, torch.Tensor):
        slots = slot_mapping
        if slots.dtype in (torch.bool, torch.complex64, torch.complex128) or slots.dtype.is_floating_point:
            raise ShapeMismatchError(f"slot_mapping is a {slots.dtype} tensor; {allowed}")
        if slots.is_meta:    # a shape without values: torch's copy would raise NotImplementedError
            raise ShapeMismatchError(f"slot_mapping must hold data (the slots); got a tensor of shape "
                                     f"{tuple(slots.shape)} on the meta device, which has none; {allowed}")
    elif isinstance(slot_mapping, (np.ndarray, list, tuple)):
        if isinstance(slot_mapping, (list, tuple)) and len(slot_mapping) == 0:
            return torch.zeros(0, dtype=torch.int64)
        try:
            arr = np.asarray(slot_mapping)
        except (ValueError, OverflowError) as e:
            raise ShapeMismatchError(f"slot_mapping is not a flat sequence of ints ({e}); {allowed}") from None
        if arr.dtype.kind not in "iu":
            raise ShapeMismatchError(f"slot_mapping holds {arr.dtype} values; {allowed}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ShapeMismatchError(f"slot_mapping holds slot {int(arr.max())}, past any cache; {allowed}")
        slots = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    else:
        raise ShapeMismatchError(f"slot_mapping is a {type(slot_mapping).__name__}; {allowed}")
    if slots.dim() != 1:
        raise ShapeMismatchError(f"slot_mapping has shape {tuple(slots.shape)}; it must be 1-D ({allowed})")
    return slots
