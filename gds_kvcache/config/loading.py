"""Building a config from a mapping, a YAML file or ``GDS_KVCACHE_*``/``LMCACHE_*`` variables.

``CacheEngineConfig.from_dict``, ``from_file`` and ``from_env`` call these
with their class, so a subclass gets instances of itself.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Mapping, Optional

from ..errors import ConfigError

__all__ = ["ConfigFileError"]

_ENV_PREFIXES = ("GDS_KVCACHE_", "LMCACHE_")
#: Fields for which ``none`` or an empty environment value means None.
_NONE_IN_ENV = ("local_disk", "slab_size", "lookup_server_url", "writer_id")
#: LMCache's names for our fields, accepted in mappings, files and the environment.
_LMCACHE_NAMES = {"lookup_url": "lookup_server_url"}


class ConfigFileError(ConfigError):
    """A config file is missing, unreadable, not YAML or not a mapping; ``field`` is ``"config file"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__("config file", os.fspath(path), problem)
        # ConfigError's "field = value is invalid" reads oddly for a file.
        self.args = (f"config file {os.fspath(path)!r} {problem}",)


def _lookup_alias(values: Mapping[str, Any], alias: str, name: str) -> Mapping[str, Any]:
    """``values`` with LMCache's field name ``alias`` renamed to ours (both given: a ConfigError)."""
    if alias not in values:
        return values
    if name in values and values[name] != values[alias]:
        raise ConfigError(alias, values[alias], f"the same value as {name} ({values[name]!r}), or only one of them")
    out = {k: v for k, v in values.items() if k != alias}
    out[name] = values[alias]
    return out


def config_from_dict(cls, values: Mapping[str, Any]):
    for alias, name in _LMCACHE_NAMES.items():
        values = _lookup_alias(values, alias, name)
    known = {f.name for f in fields(cls)}
    # str() as the sort key: YAML keys may be ints or None, which do not
    # sort against strings.
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(str(unknown[0]), values[unknown[0]], "one of " + ", ".join(sorted(known)))
    return cls(**dict(values))


def config_from_file(cls, path: str | os.PathLike):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigFileError(path, f"cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(path, "is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigFileError(path, f"is not valid YAML: syntax error{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(path, f"holds a YAML {type(data).__name__}, not a mapping of field: value pairs")
    return cls.from_dict(data)


def _env_value(name: str, raw: str) -> Optional[str]:
    raw = raw.strip()
    return None if raw.lower() in ("none", "") and name in _NONE_IN_ENV else raw


def config_from_env(cls, environ: Optional[Mapping[str, str]] = None):
    environ = os.environ if environ is None else environ
    lmcache_name = {name: alias for alias, name in _LMCACHE_NAMES.items()}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for f in fields(cls):
        if f.name == "extra":
            continue
        # Our name under either prefix first, then LMCache's name for it.
        for var in [p + n.upper() for n in (f.name, lmcache_name.get(f.name)) if n for p in _ENV_PREFIXES]:
            raw = environ.get(var)
            if raw is not None:
                values[f.name] = _env_value(f.name, raw)
                source[f.name] = var
                break
    try:
        return cls(**values)
    except ConfigError as e:
        if e.field not in source:
            raise
        raise ConfigError(e.field, e.value, f"{e.allowed} (set by environment variable {source[e.field]})") \
            from None
