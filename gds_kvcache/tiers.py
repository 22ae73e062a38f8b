"""The disk tiers above ``storage``: registers the shared tier's builder with the tier factory.

``storage`` builds the local tier itself and must not import ``shared`` (a
layer beside it that builds on it); this module, imported by the package,
tells the factory how to build the shared tier, importing ``shared`` (and
with it ``redis``) only when a config asks for it.
"""

from __future__ import annotations

from .storage.tier_factory import register_disk_tier

__all__ = ["build_shared_tier"]


def build_shared_tier(config, loop, allocator, dst_device, lookup_server):
    """The shared disk tier (``SharedDiskBackend``) for ``config.lookup_server_url``."""
    from .shared.shared_backend import SharedDiskBackend
    return SharedDiskBackend(config, loop, allocator, dst_device)


register_disk_tier("shared", build_shared_tier)
