"""Data plumbing: the IDX reader, the embedded subset, scaling to [-1, 1], padding, and clear errors."""
import gzip
import struct

import numpy as np
import pytest
import torch

from edm_lit import data


def _write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', n) for n in array.shape)
    (gzip.open if gz else open)(path, 'wb').write(header + array.astype(np.uint8).tobytes())


def _fake_split(folder, n=7, train=True, gz=True):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    stems = data._IDX_FILES[train]
    _write_idx(folder / (stems[0] + ('.gz' if gz else '')), images, gz)
    _write_idx(folder / (stems[1] + ('.gz' if gz else '')), labels, gz)
    return images, labels


@pytest.mark.parametrize('gz', [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5) % 256
    p = tmp_path / ('x.idx.gz' if gz else 'x.idx')
    _write_idx(p, a, gz)
    np.testing.assert_array_equal(data.read_idx(p), a)


def test_read_idx_errors_name_the_path(tmp_path):
    with pytest.raises(data.DataError, match='not found'):
        data.read_idx(tmp_path / 'missing.gz')
    bad = tmp_path / 'bad'
    bad.write_bytes(b'\x00\x00\x0d\x01\x00\x00\x00\x02ab')
    with pytest.raises(data.DataError, match=str(bad)):
        data.read_idx(bad)
    short = tmp_path / 'short.gz'
    _write_idx(short, np.zeros((4, 4)))
    raw = gzip.open(short).read()
    gzip.open(short, 'wb').write(raw[:-3])  # truncated payload
    with pytest.raises(data.DataError, match='header says shape'):
        data.read_idx(short)
    notgz = tmp_path / 'corrupt.gz'
    notgz.write_bytes(b'this is not gzip')
    with pytest.raises(data.DataError, match='corrupt.gz'):
        data.read_idx(notgz)


def test_to_model_range_maps_0_255_to_minus1_1_and_pads():
    u8 = np.array([[[0, 255], [127, 128]]], dtype=np.uint8)
    x = data.to_model_range(u8)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    y = data.to_model_range(np.full((3, 28, 28), 255, np.uint8), pad_to_32=True)
    assert y.shape == (3, 1, 32, 32)
    assert (y[:, :, 2:30, 2:30] == 1).all() and (y[:, :, :2] == -1).all() and (y[:, :, :, 30:] == -1).all()
    with pytest.raises(data.DataError, match='uint8'):
        data.to_model_range(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(data.DataError, match='cannot pad'):
        data.to_model_range(np.zeros((1, 40, 40), np.uint8), pad_to_32=True)


def test_embedded_subset_is_balanced_and_in_range():
    train = data.load_fashion_mnist(train=True, source='embedded')
    test = data.load_fashion_mnist(train=False, source='embedded', pad_to_32=True)
    assert train.source == 'embedded' and len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 32, 32)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert train.images.min() >= -1 and train.images.max() <= 1
    # Fashion-MNIST is mostly dark background: the mean pixel sits well below zero in [-1, 1].
    assert -0.6 < train.images.mean() < -0.3


def test_torchvision_layout_is_read_from_root(tmp_path):
    raw = tmp_path / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    images, labels = _fake_split(raw, n=5, train=False, gz=False)
    got = data.load_fashion_mnist(train=False, source='torchvision', root=tmp_path)
    assert got.source == 'torchvision' and len(got) == 5
    torch.testing.assert_close(got.images[:, 0], torch.as_tensor(images, dtype=torch.float32) / 127.5 - 1)
    assert got.labels.tolist() == labels.tolist()


def test_missing_and_corrupt_sources_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown source 'cifar'"):
        data.load_fashion_mnist(source='cifar')
    with pytest.raises(ValueError, match='limit'):
        data.load_fashion_mnist(source='embedded', limit=0)
    with pytest.raises(data.DataError, match='not found for source'):
        data.load_fashion_mnist(source='torchvision', root=tmp_path)
    bad = tmp_path / 'subset.npz'
    bad.write_bytes(b'PK\x03\x04 truncated')
    monkeypatch.setattr(data, 'EMBEDDED_SUBSET', bad)
    with pytest.raises(data.DataError, match='subset.npz'):
        data.load_fashion_mnist(source='embedded')


def test_embedded_subset_rebuilds_from_idx_files(tmp_path):
    folder = tmp_path / 'idx'
    folder.mkdir()
    for train in (True, False):
        _fake_split(folder, n=60, train=train)
    shapes = data.build_embedded_subset(tmp_path / 's.npz', per_class_train=2, per_class_test=1, folder=folder)
    with np.load(tmp_path / 's.npz') as z:
        for c in range(10):
            assert (z['train_labels'] == c).sum() <= 2 and (z['test_labels'] == c).sum() <= 1
    assert shapes['train_images'][1:] == (28, 28)


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files_match_the_embedded_subset():
    full = data.load_fashion_mnist(train=True, source='debian')
    assert full.source == 'debian' and len(full) == 60000
    sub = data.load_fashion_mnist(train=True, source='embedded')
    first_coat = int(torch.nonzero(full.labels == 4)[0])
    first_sub_coat = int(torch.nonzero(sub.labels == 4)[0])
    torch.testing.assert_close(full.images[first_coat], sub.images[first_sub_coat])
