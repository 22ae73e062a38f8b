"""Cache keys and their file-name-safe string form."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from .errors import KeyFormatError

__all__ = ["CacheEngineKey", "MAX_KEY_STRING"]

#: Longest key string; also a safe file-name length on every common file system.
MAX_KEY_STRING = 240
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_HASH = re.compile(r"[0-9a-f]{1,64}")
_ESCAPED = re.compile(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+")


def _escape(s: str) -> str:
    # Percent-encode everything outside [A-Za-z0-9._-], so "/" and "@" in model
    # names can never split a path or the key's fields.
    return "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in s)


def _unescape(s: str, what: str, text: str) -> str:
    if not _ESCAPED.fullmatch(s):
        raise KeyFormatError(f"malformed {what} {s!r} in key string {text!r}")
    try:
        return bytes(
            int(s[i + 1:i + 3], 16) if s[i] == "%" else ord(s[i])
            for i in _walk(s)
        ).decode()
    except UnicodeDecodeError:
        raise KeyFormatError(f"{what} in key string {text!r} is not UTF-8") from None


def _walk(s: str):
    i = 0
    while i < len(s):
        yield i
        i += 3 if s[i] == "%" else 1


@dataclass(frozen=True, order=True)
class CacheEngineKey:
    """Identity of one KV chunk: who made it and the prefix hash of its tokens.

    ``chunk_hash`` is kept as lowercase hex; an ``int`` is converted (an
    unsigned 64-bit prefix hash, say). ``to_string()`` gives
    ``fmt@model@world_size@worker_id@hash`` with every unsafe character
    percent-encoded, so the string is a valid file name.
    """

    fmt: str
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: Union[str, int]

    def __post_init__(self) -> None:
        h = self.chunk_hash
        if isinstance(h, int) and not isinstance(h, bool):
            if h < 0:
                raise KeyFormatError(f"chunk_hash must be non-negative, got {h}")
            object.__setattr__(self, "chunk_hash", format(h, "x"))
        elif not isinstance(h, str) or not _HASH.fullmatch(h):
            raise KeyFormatError(f"chunk_hash must be an int or 1-64 lowercase hex digits, got {h!r}")
        for name in ("fmt", "model_name"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise KeyFormatError(f"{name} must be a non-empty string, got {v!r}")
        for name in ("world_size", "worker_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise KeyFormatError(f"{name} must be a non-negative int, got {v!r}")
        if len(self.to_string()) > MAX_KEY_STRING:
            raise KeyFormatError(
                f"key string would be {len(self.to_string())} characters (max {MAX_KEY_STRING}); "
                "shorten model_name")

    def to_string(self) -> str:
        return "@".join((_escape(self.fmt), _escape(self.model_name), str(self.world_size),
                         str(self.worker_id), self.chunk_hash))

    @classmethod
    def from_string(cls, s: str) -> "CacheEngineKey":
        if not isinstance(s, str) or len(s) > MAX_KEY_STRING:
            raise KeyFormatError(f"key string must be a str of at most {MAX_KEY_STRING} characters")
        parts = s.split("@")
        if len(parts) != 5:
            raise KeyFormatError(f"key string {s!r} must have 5 '@'-separated fields, has {len(parts)}")
        fmt, model, ws, wid, h = parts
        if not ws.isdigit() or not wid.isdigit() or not ws.isascii() or not wid.isascii():
            raise KeyFormatError(f"world_size/worker_id in key string {s!r} must be decimal integers")
        key = cls(_unescape(fmt, "fmt", s), _unescape(model, "model_name", s), int(ws), int(wid), h)
        if key.to_string() != s:
            raise KeyFormatError(f"key string {s!r} is not in canonical form")
        return key
