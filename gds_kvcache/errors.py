"""Exception types raised to users of gds_kvcache.

Every user-facing check raises one of these, so callers can catch
``GdsKvCacheError`` alone. ``assert`` is kept for internal invariants.
"""

__all__ = [
    "GdsKvCacheError",
    "ConfigError",
    "KeyFormatError",
    "StorageUnavailableError",
    "StorageFullError",
    "ShapeMismatchError",
    "CorruptChunkError",
    "IOEngineError",
    "DirectoryLockedError",
    "ClosedError",
    "IndexFormatError",
    "LayoutChangedError",
]


class GdsKvCacheError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(GdsKvCacheError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, value, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"config field {field!r} = {value!r} is invalid; allowed: {allowed}")


class KeyFormatError(GdsKvCacheError, ValueError):
    """A cache key string cannot be parsed, or a key cannot be encoded safely."""


class StorageUnavailableError(GdsKvCacheError, OSError):
    """The storage directory is missing, not a directory, or not writable."""


class StorageFullError(GdsKvCacheError):
    """No room for a chunk even after evicting everything evictable."""


class ShapeMismatchError(GdsKvCacheError, ValueError):
    """A requested shape/dtype does not match the bytes stored for a chunk."""


class CorruptChunkError(GdsKvCacheError):
    """Bytes read back do not match the checksum recorded when they were written."""


class IOEngineError(GdsKvCacheError, OSError):
    """An I/O engine cannot run here, or a read/write moved fewer bytes than asked."""


class DirectoryLockedError(GdsKvCacheError):
    """Another process already serves this cache directory."""


class ClosedError(GdsKvCacheError):
    """The engine, manager or backend was closed; no further calls are taken."""


class IndexFormatError(GdsKvCacheError):
    """The on-disk index is of a format or version this library does not read (it is left untouched)."""


class LayoutChangedError(GdsKvCacheError):
    """A cache directory was written with a layout that cannot hold its chunks under the new config."""
