"""Checks and conversions of single config values; each raises ``ConfigError`` naming the field."""

from __future__ import annotations

import re
from typing import Any, Optional

from ..errors import ConfigError

#: A writer id names a subdirectory of the shared directory (``writers/<id>``).
_WRITER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
WRITER_ID_ALLOWED = ("None (the first free <hostname>-<n>) or a string of 1-64 letters, digits, '.', '_' or '-', "
                     "not '.' or '..' (quote a number in YAML)")


def _kind_name(kind: type) -> str:
    return "an integer" if kind is int else "a number"


def _parse_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, v, "a boolean (true/false, 1/0, yes/no, on/off)")


def _parse_number(name: str, v: Any, kind: type) -> Any:
    what = _kind_name(kind)
    if isinstance(v, bool):
        raise ConfigError(name, v, what)
    if isinstance(v, str):
        try:
            v = kind(v.strip()) if kind is int else float(v.strip())
        except ValueError:
            raise ConfigError(name, v, what) from None
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ConfigError(name, v, what)
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(name, v, "a finite number")
    return kind(v)


def _parse_seconds(name: str, v: Any, limit: float, limit_allowed: bool) -> float:
    """``v`` as seconds in ``0 < v < limit`` (``<= limit`` when ``limit_allowed``).

    Any bad value, a non-number included, gets the whole range in its message.
    """
    allowed = f"seconds, more than 0 and {'at most' if limit_allowed else 'less than'} {limit:g}"
    try:
        s = _parse_number(name, v, float)
    except ConfigError:
        raise ConfigError(name, v, allowed) from None
    if not (0 < s <= limit if limit_allowed else 0 < s < limit):
        raise ConfigError(name, v, allowed)
    return s


def is_writer_id(v: Any) -> bool:
    """Whether ``v`` can name a writer (its subdirectory of a shared directory): the one check."""
    return isinstance(v, str) and _WRITER_ID.fullmatch(v) is not None and v not in (".", "..")


def _parse_writer_id(name: str, v: Any) -> Optional[str]:
    # Not coerced from an int: YAML reads 007 as 7, and the directory would not be the one meant.
    if v is None:
        return None
    if not is_writer_id(v):
        raise ConfigError(name, v, WRITER_ID_ALLOWED)
    return v


def _valid_redis_url(url: str) -> bool:
    """Whether ``url`` is a Redis URL the client can use: a scheme, a host, a port in range and a
    numeric database, or a unix socket path; no query (an option the client might reject later)."""
    from urllib.parse import urlsplit

    if re.search(r"\s", url):
        return False
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    if u.query or u.fragment:
        return False
    if u.scheme == "unix":
        return not u.netloc and len(u.path) > 1
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        return False
    if port is not None and not 1 <= port <= 65535:
        return False
    return u.path in ("", "/") or re.fullmatch(r"/\d{1,9}", u.path) is not None
