"""AMX permission for vLLM-CPU workers: one Linux call, made before the first forward pass.

Invariant: asking is harmless everywhere (on a machine or kernel without AMX the call fails and
nothing changes), so the worker asks unconditionally at start.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["allow_amx"]


def allow_amx() -> bool:
    """Ask Linux for permission to use AMX tiles in this process (x86-64); True if granted.

    vLLM-CPU's attention kernel uses AMX without asking. A process whose first
    forward pass attends over KV loaded from this tier (a restart that hits at
    once) has not run the oneDNN GEMMs that would have asked, and dies of
    SIGILL. Asking is harmless where AMX is absent (the call fails).
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        return libc.syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False
