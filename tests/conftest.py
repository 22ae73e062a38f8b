import contextlib
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

import numpy as np
import pytest
import torch

from gds_kvcache.io import kvikio_error

ON_CI = os.environ.get("CI") == "true"


def probe_cuda():
    """Tell whether torch can use a CUDA device in this process.

    Returns
    -------
    (bool, str)
        True and "" where a device is usable; False and the reason otherwise.

    Notes
    -----
    A CUDA build of torch whose driver library is older than its CUDA (say torch for
    CUDA 13 with the CUDA 12.5 ``libcuda.so.1`` that scripts/fetch-libcuda.sh puts on
    CI) warns "CUDA initialization: The NVIDIA driver on your system is too old" at its
    first CUDA query and then reports no device. Under ``filterwarnings = error`` that
    warning, raised at import of this file, is a collection error that runs no test, so
    the probe records warnings instead of raising them: any warning or error here just
    means "no GPU". torch caches the device count and warns once per process, so after
    this probe the library's own ``torch.cuda.is_available()`` calls in tests stay silent;
    a probe in a subprocess would leave that first warning to a test. Look at the skip
    reason of a ``gpu`` test (``pytest -ra``) to see why a GPU machine skipped it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as exc:  # a broken driver must read as "no GPU", not stop the run
            return False, f"CUDA probe failed: {type(exc).__name__}: {exc}"
    if count > 0:
        return True, ""
    # First sentence only: torch's driver warning goes on with download advice and a C++ path.
    said = "; ".join(dict.fromkeys(str(w.message).strip().split(". ")[0] for w in caught))
    if not said and torch.version.cuda is None:
        said = f"torch {torch.__version__} is a CPU-only build"
    return False, said or "torch sees no CUDA device"


HAS_GPU, NO_GPU_REASON = probe_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU ({NO_GPU_REASON})")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


_CI_NOTHING_PASSED = []


def pytest_sessionfinish(session, exitstatus):
    # On CI a run that passes no test is a failure, however it ended up so (every test
    # skipped, a deselecting option): exit 5 is what .ci/run and scripts/run-tests.sh
    # report as "ran no test". Not for --collect-only, which runs nothing by design.
    if not ON_CI or exitstatus != pytest.ExitCode.OK or session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not reporter.stats.get("passed"):
        _CI_NOTHING_PASSED.append(True)
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def pytest_terminal_summary(terminalreporter):
    # Runs after pytest_sessionfinish above, inside the summary, so the line is not lost
    # at the end of a progress line.
    if _CI_NOTHING_PASSED:
        terminalreporter.write_sep("!", "CI: no test passed; failing the run (exit 5)", red=True, bold=True)


@functools.lru_cache(maxsize=None)
def kvikio_unavailable() -> Optional[str]:
    """None where the KvikIO engine can run here, else why not: the one place the suite decides it.

    The decision is the library's own (``gds_kvcache.io.kvikio_error``, what
    ``io_engine="kvikio"`` and ``"auto"`` go by), so a test never runs KvikIO
    where the library would refuse it, nor skips where it would run. A missing
    driver library is named as the loader saw it: "KvikIO needs libcuda.so.1:
    <dlopen's error>" (KvikIO loads ``libcuda.so.1`` for every read and write,
    host memory and compat mode included; ``scripts/run-tests.sh`` puts a
    fetched one on ``LD_LIBRARY_PATH``, a plain ``pytest`` may have none).
    """
    err = kvikio_error()
    if err is None:
        return None
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return err                      # not installed: the library's reason says how to install it
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"KvikIO needs libcuda.so.1: {e}"
    return err


def require_kvikio():
    """Skip where KvikIO cannot run (``kvikio_unavailable`` says why), except on CI, where it must
    (compat mode)."""
    err = kvikio_unavailable()
    if err is not None:
        if ON_CI:
            pytest.fail(f"KvikIO engine must run in CI (compat mode): {err}")
        pytest.skip(err)


@pytest.fixture(autouse=True)
def _kvikio_cases(request):
    """Every test case parametrized with the value ``"kvikio"`` (any argument name: ``engine``,
    ``name``, the ``engine_name`` fixture's param...) needs KvikIO: ``require_kvikio`` decides for
    all of them, before the test body or its other function fixtures run."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and any(isinstance(v, str) and v == "kvikio" for v in callspec.params.values()):
        require_kvikio()


ENGINES = ["posix", "kvikio"]


@pytest.fixture(params=ENGINES)
def engine_name(request):
    if request.param == "kvikio":
        require_kvikio()
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
    """A real tmpfs of ``size`` (mount's syntax, e.g. ``"1m"``) at ``path``, unmounted after.

    Needs root, which CI has: fails there when the mount does, skips elsewhere.
    """
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        msg = f"cannot mount a small tmpfs: {r.stderr.decode().strip()}"
        if ON_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def shm_dir():
    """A new directory on the /dev/shm tmpfs (the RAM-backed case), removed after."""
    from gds_kvcache.io.select import ram_backed_fs

    if not os.path.isdir("/dev/shm") or ram_backed_fs("/dev/shm") is None:
        if ON_CI:
            pytest.fail("/dev/shm must be a tmpfs on CI")
        pytest.skip("no tmpfs at /dev/shm")
    d = tempfile.mkdtemp(prefix="gds_kvcache-test-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)
