import os

import numpy as np
import pytest
import torch

from gds_kvcache.io import kvikio_error

ON_CI = os.environ.get("CI") == "true"
HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def require_kvikio():
    """Skip where KvikIO cannot run, except on CI, where it must (compat mode)."""
    err = kvikio_error()
    if err is not None:
        if ON_CI:
            pytest.fail(f"KvikIO engine must run in CI (compat mode): {err}")
        pytest.skip(err)


ENGINES = ["posix", "kvikio"]


@pytest.fixture(params=ENGINES)
def engine_name(request):
    if request.param == "kvikio":
        require_kvikio()
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
