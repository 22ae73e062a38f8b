"""Cache keys and their file-name-safe string form."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

from .errors import KeyFormatError

__all__ = ["CacheEngineKey", "MAX_KEY_STRING"]

#: Longest key string; also a safe file-name length on every common file system.
MAX_KEY_STRING = 240
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_SAFE_RUN = re.compile(r"[A-Za-z0-9._-]*")
# Ints with this many digits cannot fit in a key string (and str() of very
# long ints raises ValueError).
_INT_LIMIT = 10 ** MAX_KEY_STRING
_HASH_DIGITS = 64
_HASH = re.compile(rf"[0-9a-f]{{1,{_HASH_DIGITS}}}")
_ESCAPED = re.compile(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+")


@functools.lru_cache(maxsize=1024)
def _escape(s: str) -> str:
    # Percent-encode everything outside [A-Za-z0-9._-], so "/" and "@" in model
    # names can never split a path or the key's fields. Cached: a process sees a
    # few formats and model names, and a lookup formats every key of a prompt.
    if _SAFE_RUN.fullmatch(s):
        return s
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

    Notes
    -----
    Construction refuses (``KeyFormatError``) every key whose string would not
    parse back to the same key, so nothing can be stored under a key that a
    restart then drops as invalid: hashes of more than 256 bits (64 hex
    digits), text holding lone surrogates, and keys whose string would exceed
    ``MAX_KEY_STRING`` characters.
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
            if h.bit_length() > 4 * _HASH_DIGITS:
                raise KeyFormatError(f"chunk_hash must be below 2**{4 * _HASH_DIGITS} ({_HASH_DIGITS} hex digits), "
                                     f"got an int of {h.bit_length()} bits")
            object.__setattr__(self, "chunk_hash", format(h, "x"))
        elif not isinstance(h, str) or not _HASH.fullmatch(h):
            raise KeyFormatError(f"chunk_hash must be an int or 1-{_HASH_DIGITS} lowercase hex digits, got {h!r}")
        else:
            object.__setattr__(self, "chunk_hash", str(h))
        for name in ("fmt", "model_name"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise KeyFormatError(f"{name} must be a non-empty string, got {v!r}")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise KeyFormatError(f"{name} {v!r} is not valid Unicode text (it holds a lone surrogate), "
                                     "so it cannot be part of a key") from None
            object.__setattr__(self, name, str(v))
        for name in ("world_size", "worker_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise KeyFormatError(f"{name} must be a non-negative int, got {v!r}")
            if v >= _INT_LIMIT:
                raise KeyFormatError(f"{name} has more than {MAX_KEY_STRING} digits")
            # An int subclass (an IntEnum, say) could print as something other than digits.
            object.__setattr__(self, name, int(v))
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
