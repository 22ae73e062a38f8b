"""Memory: chunk layouts, slab buffers and the slab allocator."""

from .allocator import MemoryAllocatorInterface, SlabMemoryAllocator
from .buffers import SlabBuffer, as_io_buffer, resolve_memory_device
from .extents import ExtentAllocator
from .format import MemoryFormat, dtype_to_str, str_to_dtype
from .obj import MemoryObj

__all__ = [
    "ExtentAllocator",
    "MemoryAllocatorInterface",
    "MemoryFormat",
    "MemoryObj",
    "SlabBuffer",
    "SlabMemoryAllocator",
    "as_io_buffer",
    "dtype_to_str",
    "resolve_memory_device",
    "str_to_dtype",
]
