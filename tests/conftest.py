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


@pytest.fixture
def images(tmp_path, monkeypatch):
    """12 random 8x8 RGB images in tmp_path/images, and tmp_path as the working folder (for the CLI tests' runs)."""
    import numpy as np
    from PIL import Image
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12): Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f'{i:02d}.png')
    monkeypatch.chdir(tmp_path)
    return folder
