import os
import subprocess
import sys
from pathlib import Path


def test_cuda_kernels_under_the_numba_simulator():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "tests.sim_main"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SIMULATOR OK" in r.stdout
