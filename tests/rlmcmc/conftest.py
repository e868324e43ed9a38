"""Per-test thread limits for the rlmcmc tests (the package itself is installed in the venv)."""

import pytest


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
