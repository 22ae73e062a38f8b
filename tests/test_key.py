import os

import pytest
from hypothesis import given, strategies as st

from gds_kvcache import CacheEngineKey, KeyFormatError
from gds_kvcache.key import MAX_KEY_STRING


@given(fmt=st.text(min_size=1, max_size=20), model=st.text(min_size=1, max_size=40),
       ws=st.integers(1, 1024), wid=st.integers(0, 1023), h=st.integers(0, 2**128))
def test_round_trip_and_file_name_safe(fmt, model, ws, wid, h):
    try:
        k = CacheEngineKey(fmt, model, ws, wid, h)
    except KeyFormatError:
        return  # too long once escaped: refused, never truncated
    s = k.to_string()
    assert CacheEngineKey.from_string(s) == k
    assert "/" not in s and "\x00" not in s and len(s) <= MAX_KEY_STRING
    assert s not in (".", "..")


def test_key_string_is_a_usable_file_name(tmp_path):
    k = CacheEngineKey("vllm", "meta-llama/Llama-3.1-8B-Instruct", 8, 3, "0123abcdef")
    (tmp_path / k.to_string()).write_bytes(os.urandom(8))
    assert os.listdir(tmp_path) == [k.to_string()]


@pytest.mark.parametrize("s", ["", "a@b", "vllm@m@1@0@XYZ", "vllm@m/x@1@0@ab", "vllm@m@-1@0@ab",
                               "vllm@m@01@0@ab", "vllm@m@1@0@", "vllm@m%zz@1@0@ab", "x" * 300, "v@m@1@0@ab@c",
                               "vllm@m@١@0@ab"])
def test_malformed_strings(s):
    with pytest.raises(KeyFormatError):
        CacheEngineKey.from_string(s)


def test_bad_fields():
    with pytest.raises(KeyFormatError):
        CacheEngineKey("vllm", "m", 1, 0, -5)
    with pytest.raises(KeyFormatError):
        CacheEngineKey("vllm", "x" * 300, 1, 0, 5)
    with pytest.raises(KeyFormatError):
        CacheEngineKey("", "m", 1, 0, 5)


# -- every key that can be built round-trips (issue 9 item 12) --------------------------
@pytest.mark.parametrize("h", [2**256, 2**256 + 5, 16**65 - 1, 2**1000])
def test_hash_too_wide_for_a_key_string_is_refused(h):
    with pytest.raises(KeyFormatError, match="chunk_hash"):
        CacheEngineKey("vllm", "m", 1, 0, h)


def test_widest_hash_round_trips():
    k = CacheEngineKey("vllm", "m", 1, 0, 2**256 - 1)
    assert len(k.chunk_hash) == 64 and CacheEngineKey.from_string(k.to_string()) == k


@pytest.mark.parametrize("field,value", [("model_name", "m\ud800"), ("fmt", "\udcffvllm"), ("model_name", "a\udfff")])
def test_lone_surrogate_is_a_key_error_naming_the_field(field, value):
    kw = dict(fmt="vllm", model_name="m", world_size=1, worker_id=0, chunk_hash=5)
    kw[field] = value
    with pytest.raises(KeyFormatError, match=field):
        CacheEngineKey(**kw)


def test_huge_or_odd_int_fields():
    with pytest.raises(KeyFormatError, match="world_size"):
        CacheEngineKey("vllm", "m", 10**5000, 0, 5)  # str() of it raises ValueError
    from enum import IntEnum

    class Rank(IntEnum):
        ZERO = 0

    k = CacheEngineKey("vllm", "m", 1, Rank.ZERO, 5)
    assert type(k.worker_id) is int and CacheEngineKey.from_string(k.to_string()) == k


# Lone surrogates and hashes just past 256 bits are drawn often on purpose:
# st.text and st.integers would almost never produce them.
@given(fmt=st.text(min_size=1, max_size=8),
       model=st.text(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udcff"])), min_size=1, max_size=30),
       ws=st.one_of(st.integers(0, 1024), st.integers(0, 10**300)), wid=st.integers(0, 1024),
       h=st.one_of(st.integers(0, 2**64), st.integers(2**250, 2**260), st.text("0123456789abcdefX", max_size=70)))
def test_every_constructible_key_round_trips(fmt, model, ws, wid, h):
    try:
        k = CacheEngineKey(fmt, model, ws, wid, h)
    except KeyFormatError:
        return
    assert CacheEngineKey.from_string(k.to_string()) == k
