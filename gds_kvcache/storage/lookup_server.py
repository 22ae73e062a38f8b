"""``LookupServerInterface``: where a cluster-wide index of stored keys plugs in."""

from __future__ import annotations

import abc

from ..key import CacheEngineKey

__all__ = ["LookupServerInterface"]


class LookupServerInterface(abc.ABC):
    """Told of every key a backend stores or drops; asked which keys exist.

    Every constructor in this library accepts ``lookup_server=None``.
    """

    @abc.abstractmethod
    def insert(self, key: CacheEngineKey) -> None:
        """Record that ``key`` is stored here."""

    @abc.abstractmethod
    def remove(self, key: CacheEngineKey) -> None:
        """Record that ``key`` is no longer stored here."""

    @abc.abstractmethod
    def lookup(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored somewhere known to the server."""
