"""Defaults fitted to the machine: the slab size an untuned config gets here.

The default slab is LMCache's 5 GB bounded by a share of physical memory
(host and pinned slabs) or of free GPU memory (cuda slabs), so an untuned
config never pins or zero-fills most of a small machine.
"""

from __future__ import annotations

import os

from ..units import GB, MiB, PAGE

__all__ = ["CUDA_SLAB_SHARE", "DEFAULT_CPU_SIZE_GB", "HOST_SLAB_SHARE", "physical_memory"]

#: LMCache's default ``max_local_cpu_size`` (GB); also the default slab size.
DEFAULT_CPU_SIZE_GB = 5.0
#: Share of physical memory a default host or pinned slab may take.
HOST_SLAB_SHARE = 1 / 8
#: Share of the free memory of the GPU a default cuda slab may take.
CUDA_SLAB_SHARE = 1 / 4
# Smallest default slab, whatever the machine: below this a few chunks of a
# real model no longer fit and every put would wait on eviction.
_MIN_DEFAULT_SLAB = 64 * MiB


class _MachineDefault(float):
    """LMCache's default ``max_local_cpu_size``, marked as not chosen by the user.

    A float, so code that reads the field as LMCache's number keeps working;
    the type lets the config tell "left at 5.0" from "set to 5.0".
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)

    def __reduce__(self):
        return (_MachineDefault, (float(self),))


def physical_memory() -> int:
    """Bytes of memory this process can use: physical RAM, or less under a cgroup limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # In a container the cgroup limit, not the host's RAM, is what an
    # allocation runs into; "max" or a huge v1 value means no limit.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
        break
    return total


def _slab_device(memory_device: str) -> tuple[str, str]:
    """Where a slab of ``memory_device`` lives for sizing: ``cuda`` or host memory, and why."""
    import torch

    gpu = torch.cuda.is_available()
    if memory_device == "auto":
        return ("cuda", "a CUDA GPU is visible") if gpu else ("host", "no CUDA GPU visible")
    if memory_device == "cuda" and not gpu:
        # Building the slab will refuse this; size as host meanwhile so that
        # describing the config still works.
        return "host", "no CUDA GPU visible"
    return memory_device, "set"


def _fit_default(memory_device: str, cuda_device: int) -> tuple[int, str]:
    """The default ``max_local_cpu_size`` in bytes on this machine, and the reason in words."""
    device, _ = _slab_device(memory_device)
    want = int(DEFAULT_CPU_SIZE_GB * GB)
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(cuda_device)
        share, bound = f"1/{round(1 / CUDA_SLAB_SHARE)}", int(free * CUDA_SLAB_SHARE)
        base = f"{free / GB:.1f} GB free on cuda:{cuda_device}"
    else:
        phys = physical_memory()
        share, bound = f"1/{round(1 / HOST_SLAB_SHARE)}", int(phys * HOST_SLAB_SHARE)
        base = f"{phys / GB:.1f} GB physical memory, {device} slab"
    if bound >= want:
        return want, f"fits in {share} of the {base}"
    return max(_MIN_DEFAULT_SLAB, bound // PAGE * PAGE), f"bounded to {share} of the {base}"
