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
