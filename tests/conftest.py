import pytest


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread: on a shared 2-core machine it is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
