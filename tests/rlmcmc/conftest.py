"""Make ``import rlmcmc`` work from a source checkout without an install."""

import os
import sys

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
try:
    import rlmcmc  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _single_threaded_kernels():
    """The rlmcmc tests use tiny dense/sparse systems and MLPs; BLAS/torch threads only add overhead
    (and are very slow on a shared 2-core machine). Scoped to this directory's tests, restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(threads)
