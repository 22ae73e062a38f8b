"""``gds-kvcache``: bad command lines, environments and config files are one line on stderr, never a traceback.

The whole matrix runs in-process through ``cli.main`` (as ``python -m
gds_kvcache`` calls it); a few cases also run as real ``python -m
gds_kvcache`` processes, which is what a user sees. Sizes are tiny and
directories temporary, so a case that is wrongly accepted still ends fast.
"""

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import gds_kvcache
from gds_kvcache import cli
from gds_kvcache.cli import main

ROOT = Path(gds_kvcache.__file__).parents[1]

# name -> (argv, extra environment, expected exit status, text the one stderr line must hold)
CASES = {
    "mistyped command": (["benhc"], {}, 2, "unknown command 'benhc'"),
    "unknown command": (["frobnicate", "--dir", "{tmp}"], {}, 2, "valid commands: demo, info, bench"),
    "demo zero chunk": (["demo", "--chunk-mib", "0", "--dir", "{tmp}/d"], {}, 2, "--chunk-mib"),
    "demo negative total": (["demo", "--total-mib", "-5", "--chunk-mib", "1", "--dir", "{tmp}/d"], {}, 2,
                            "--total-mib"),
    "demo total below chunk": (["demo", "--total-mib", "1", "--chunk-mib", "2", "--dir", "{tmp}/d"], {}, 2,
                               "--total-mib"),
    "default command bad int": (["--chunk-mib", "x", "--dir", "{tmp}/d"], {}, 2, "--chunk-mib"),
    "demo dir is a file": (["demo", "--total-mib", "1", "--chunk-mib", "1", "--dir", "{tmp}/file"], {}, 2,
                           "not a directory"),
    "demo json dir missing": (["demo", "--total-mib", "1", "--chunk-mib", "1", "--dir", "{tmp}/d",
                               "--json", "{tmp}/no/such/r.json"], {}, 2, "--json"),
    "demo bad flag": (["demo", "--no-such-flag"], {}, 2, "unrecognized arguments"),
    "bench dir missing": (["bench", "--smoke", "--dir", "{tmp}/missing", "--out", "{tmp}"], {}, 2, "does not exist"),
    "bench zero size": (["bench", "--sizes", "0", "--total", "1M", "--dir", "{tmp}", "--out", "{tmp}"], {}, 2,
                        "--sizes"),
    "bench negative total": (["bench", "--sizes", "1M", "--total", "-5M", "--dir", "{tmp}", "--out", "{tmp}"], {},
                             2, "--total"),
    "bench unknown path": (["bench", "--smoke", "--paths", "raw,nope", "--dir", "{tmp}", "--out", "{tmp}"], {}, 2,
                           "nope"),
    "bench zero threads": (["bench", "--smoke", "--threads", "0", "--dir", "{tmp}", "--out", "{tmp}"], {}, 2,
                           "--threads"),
    "bench-kernels zero layers": (["bench-kernels", "--smoke", "--layers", "0", "--out", "{tmp}"], {}, 2,
                                  "--layers"),
    "bench-kernels bad layout": (["bench-kernels", "--smoke", "--layouts", "vllm,nope", "--out", "{tmp}"], {}, 2,
                                 "--layouts"),
    "bench-alloc negative pairs": (["bench-alloc", "--pairs", "-3", "--out", "{tmp}"], {}, 2, "--pairs"),
    "info bad flag": (["info", "--bogus"], {}, 2, "unrecognized arguments: --bogus"),
    "bad env value": (["bench-alloc", "--smoke", "--out", "{tmp}"], {"GDS_KVCACHE_IO_THREADS": "abc"}, 2,
                      "GDS_KVCACHE_IO_THREADS"),
    "bad env value, info": (["info", "--dir", "{tmp}"], {"LMCACHE_CHUNK_SIZE": "0"}, 2, "LMCACHE_CHUNK_SIZE"),
    "info config missing": (["info", "--dir", "{tmp}", "--config", "{tmp}/missing.yaml"], {}, 1, "missing.yaml"),
    "info config not yaml": (["info", "--dir", "{tmp}", "--config", "{tmp}/bad.yaml"], {}, 1,
                             "syntax error at line"),
    "library error inside a command": (["info", "--dir", "{tmp}", "--config", "{tmp}/wrong.yaml"], {}, 1,
                                       "gds-kvcache info: error: config field 'io_threads'"),
}
if importlib.util.find_spec("gds_kvcache.bench.ttft") is not None:
    CASES["bench-ttft bad flag"] = (["bench-ttft", "--bogus"], {}, 2, "unrecognized arguments: --bogus")

HELP = [[], ["demo"], ["info"], ["bench"], ["bench-kernels"], ["bench-alloc"], ["bench-ttft"]]
# The cases that also run as processes (each costs a torch import).
IN_A_PROCESS = ["mistyped command", "demo zero chunk", "bad env value", "info config not yaml"]


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "file").write_bytes(os.urandom(64))
    (tmp_path / "bad.yaml").write_text("chunk_size: 64\nio_engine: [posix\n")
    (tmp_path / "wrong.yaml").write_text("chunk_size: 64\nio_threads: abc\n")
    return tmp_path


def _argv(argv, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("GDS_KVCACHE_", "LMCACHE_")):
            monkeypatch.delenv(k)


def _check(code, stderr, name):
    _, _, want, text = CASES[name]
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert code == want, (code, stderr)
    assert lines[0].startswith("gds-kvcache") and ": error: " in lines[0], lines[0]
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_use_is_one_line_and_an_exit_status(tmp, capsys, monkeypatch, name):
    argv, env, _, _ = CASES[name]
    _clean_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp)
    try:
        code = main(_argv(argv, tmp))
    except SystemExit as e:  # what argparse raises; python -m turns it into the exit status
        code = e.code
    _check(code, capsys.readouterr().err, name)


def test_mistyped_command_lists_the_commands(capsys):
    assert main(["benhc"]) == 2
    line = capsys.readouterr().err.strip()
    assert all(c in line for c in ("demo", "info", "bench-kernels", "bench-alloc", "bench-ttft"))
    assert "did you mean 'bench'" in line


@pytest.mark.parametrize("cmd", HELP, ids=lambda c: " ".join(c) or "top")
def test_help_still_works(capsys, cmd):
    try:
        code = main(cmd + ["--help"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code == 0 and "usage" in out.out.lower() and not out.err.strip(), out.err


def test_command_whose_module_is_missing(capsys, monkeypatch):
    # How bench-ttft behaved before its module existed, and any command in an install without its module.
    monkeypatch.setitem(cli.COMMANDS, "bench-ttft", "gds_kvcache.bench.no_such_module")
    assert main(["bench-ttft", "--layers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gds-kvcache bench-ttft: error: ") and len(err.strip().splitlines()) == 1


def _run(argv, extra_env, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDS_KVCACHE_", "LMCACHE_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "gds_kvcache", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_as_a_process(tmp):
    names = [n for n in IN_A_PROCESS if n in CASES]
    with ThreadPoolExecutor(3) as pool:
        futures = {n: pool.submit(_run, _argv(CASES[n][0], tmp), CASES[n][1], tmp) for n in names}
        futures["help"] = pool.submit(_run, ["bench", "--help"], {}, tmp)
        results = {n: f.result() for n, f in futures.items()}
    for n in names:
        _check(results[n].returncode, results[n].stderr, n)
    assert results["help"].returncode == 0 and "usage: gds-kvcache bench" in results["help"].stdout
