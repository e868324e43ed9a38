import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny GEMMs; on a shared 2-core machine two intra-op threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
