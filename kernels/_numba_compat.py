"""Keep Numba's CUDA target importable on NumPy 2.5+.

numba-cuda (0.30.4 and older) registers an overload for ``np.row_stack``
when its typing context first loads; NumPy 2.5 removed that alias, so every
``@cuda.jit`` compile fails with AttributeError. ``row_stack`` was always
``vstack``, so restoring the alias changes nothing else.
"""

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

# Chunk-sized launches (a few tokens, one layer group) are normal here; Numba's
# low-occupancy warning would fire on every small store.
from numba import config as _config  # noqa: E402

_config.CUDA_LOW_OCCUPANCY_WARNINGS = False
