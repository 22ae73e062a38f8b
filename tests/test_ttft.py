"""bench-ttft on CPU: argument handling, the missing-GPU/transformers error, and a tiny model end to end."""

import argparse
import json
import sys
import types

import pytest
import torch

from gds_kvcache.bench import ttft
from gds_kvcache.errors import StorageFullError

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=1000)


def test_parse_tokens():
    assert ttft.parse_tokens("8192,32768") == [8192, 32768]
    assert ttft.parse_tokens("8k, 32K,100") == [8192, 32768, 100]
    for bad in ("", "abc", "8192,", "0", "-5", "1.5k"):
        with pytest.raises(argparse.ArgumentTypeError):
            ttft.parse_tokens(bad)


@pytest.mark.parametrize("argv", [["--tokens", "eight"], ["--layers", "0"], ["--reps", "x"], ["--io-engine", "fast"],
                                  ["--unknown"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ttft.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_gpu_is_one_clear_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ttft.main(["--layers", "1", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gds-kvcache bench-ttft: error: bench-ttft needs a CUDA GPU"), \
        out.err
    assert out.out == "" and not list(tmp_path.iterdir())


def test_missing_transformers_is_named(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes "import transformers" raise ImportError
    assert ttft.main([]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'transformers' package" in lines[0] and "GPU" not in lines[0]


def test_no_room_is_one_error_line_before_the_model_is_built(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ttft, "missing_requirements", lambda: None)
    monkeypatch.setattr(ttft.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1 << 30, used=0,
                                                                                  free=1 << 20))
    monkeypatch.setattr(ttft, "build_model", lambda *a, **k: pytest.fail("built the model first"))
    where = tmp_path / "not-made-yet"
    assert ttft.main(["--dir", str(where), "--tokens", "8k", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "GB free" in lines[0] and "--dir" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageFullError, match="GB free"):  # run() called directly says the same
        ttft.run(tokens=[8192], layers=1, directory=str(where))
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_prefill_store_restart_retrieve_on_cpu(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (an optional bench dependency)")
    # Lengths that end mid-chunk and mid-block, so the partial last chunk is stored and read back too.
    r = ttft.run(tokens=(40, 100), layers=2, directory=str(tmp_path), reps=1, chunk=16, block=8, device="cpu",
                 shape=TINY, memory_device="host")
    assert [x["tokens"] for x in r["rows"]] == [40, 100]
    for row in r["rows"]:
        assert row["exact"] is True
        assert row["stored tokens"] == row["loaded tokens"] == row["tokens"]
        assert row["GB moved"] == 2 * 2 * row["tokens"] * 2 * 16 * 2 / 1e9
        assert row["io path"].startswith("engine=")
    assert r["model"]["num_hidden_layers"] == 2 and r["model"]["num_key_value_heads"] == 2
    assert list(tmp_path.iterdir()) == []  # the cache directory is removed


def test_tiny_model_byte_check_catches_a_wrong_byte(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed (an optional bench dependency)")
    real = ttft.CacheEngine.retrieve

    def corrupting(self, tokens, kv_caches, slot_mapping):
        n = real(self, tokens, kv_caches, slot_mapping)
        row = kv_caches[1].view(2, -1, 32)[1, int(slot_mapping[5])].view(torch.int16)
        row[3] ^= 1  # one bit of one value of layer 1
        return n

    monkeypatch.setattr(ttft.CacheEngine, "retrieve", corrupting)
    r = ttft.run(tokens=(40,), layers=2, directory=str(tmp_path), reps=1, chunk=16, block=8, device="cpu",
                 shape=TINY, memory_device="host")
    assert r["rows"][0]["exact"] is False and r["rows"][0]["loaded tokens"] == 40


@pytest.mark.gpu
def test_gpu_bench_ttft_quick_run(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (an optional bench dependency)")
    out = tmp_path / "out"
    assert ttft.main(["--layers", "2", "--tokens", "1000,2k", "--reps", "1", "--dir", str(tmp_path),
                      "--out", str(out)]) == 0
    r = json.loads((out / "bench_ttft.json").read_text())
    assert [x["tokens"] for x in r["rows"]] == [1000, 2048]
    assert all(x["exact"] is True and x["loaded tokens"] == x["tokens"] for x in r["rows"])
    assert "retrieve ms" in capsys.readouterr().out
