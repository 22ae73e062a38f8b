"""One big 4 KiB-aligned buffer per slab, in CUDA, pinned host or plain host memory."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..units import PAGE

__all__ = ["SlabBuffer", "as_io_buffer", "resolve_memory_device"]

log = logging.getLogger(__name__)


def resolve_memory_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "host"
    if kind in ("cuda", "pinned") and not torch.cuda.is_available():
        raise ConfigError("memory_device", kind, "'host' or 'auto' on a machine without a usable CUDA GPU")
    return kind


def as_io_buffer(t: torch.Tensor):
    """What an I/O engine can read into or write from: the tensor on GPU, a NumPy view on host."""
    if t.is_cuda:
        return t
    return t.view(torch.uint8).numpy()


class SlabBuffer:
    """A contiguous ``uint8`` tensor of ``nbytes`` whose first byte is 4 KiB-aligned.

    Parameters
    ----------
    nbytes
        Usable bytes (rounded up to 4 KiB).
    kind
        ``cuda``, ``pinned`` or ``host``.
    cuda_device
        Device index for ``cuda``.

    Notes
    -----
    GDS DMAs only between 4 KiB-aligned GPU addresses and file offsets, and
    O_DIRECT needs aligned host buffers, so the raw allocation is one page
    larger and the view starts at the first aligned address in it.
    """

    def __init__(self, nbytes: int, kind: str, cuda_device: int = 0):
        self.kind = kind
        self.nbytes = (nbytes + PAGE - 1) // PAGE * PAGE
        if kind == "cuda":
            raw = torch.empty(self.nbytes + PAGE, dtype=torch.uint8, device=f"cuda:{cuda_device}")
        elif kind == "pinned":
            raw = torch.empty(self.nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
        elif kind == "host":
            # Touch every page now: first-touch faults on the read path cost
            # more than the copy itself and stall all I/O threads on mm locks.
            raw = torch.zeros(self.nbytes + PAGE, dtype=torch.uint8)
        else:
            raise ConfigError("memory_device", kind, "cuda | pinned | host")
        skew = (-raw.data_ptr()) % PAGE
        self._raw = raw
        self.tensor = raw[skew:skew + self.nbytes]
        assert self.tensor.data_ptr() % PAGE == 0
        self.registered = False
        self._host_array = None

    def host_array(self):
        """The buffer as a NumPy ``uint8`` array (host kinds only), made once."""
        if self._host_array is None:
            assert self.kind != "cuda", "no NumPy view of GPU memory"
            self._host_array = self.tensor.numpy()
        return self._host_array

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def register_gds(self) -> bool:
        """Register the whole allocation with cuFile once, if GDS (not compat mode) will run."""
        if self.kind != "cuda" or self.registered:
            return self.registered
        try:
            import kvikio
            import kvikio.defaults
        except ImportError:
            return False
        if kvikio.defaults.is_compat_mode_preferred():
            return False
        kvikio.memory_register(self._raw)
        self.registered = True
        log.info("registered %d-byte CUDA slab with cuFile", self._raw.numel())
        return True

    def close(self) -> None:
        if self.registered:
            import kvikio

            kvikio.memory_deregister(self._raw)
            self.registered = False
