"""Size units and alignment helpers shared by every layer."""

__all__ = ["GB", "MiB", "KiB", "PAGE", "align_up", "align_down"]

KiB = 1 << 10
MiB = 1 << 20
#: LMCache's "GB" in config files is a binary gigabyte; keep that meaning.
GB = 1 << 30
#: GPUDirect Storage DMA granularity: file offsets, sizes and GPU addresses
#: must be multiples of this for cuFile to skip its bounce buffers.
PAGE = 4 * KiB


def align_up(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int = PAGE) -> int:
    return n // a * a
