import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_threads():
    """A CLI run sets torch's thread count (--threads): restore it for the next test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
