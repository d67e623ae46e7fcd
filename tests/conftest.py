"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors in these tests are small: one torch thread avoids waking a thread pool for every tiny op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
