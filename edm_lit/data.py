"""Data plumbing: Fashion-MNIST from Debian's files, torchvision or the embedded subset (plain module, not generated).

Images come back as float32 tensors in [-1, 1] of shape (N, 1, H, W) with int64 labels. Sources, in the order
`source="auto"` tries them: Debian's package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), files
already downloaded by torchvision under `root`, and the small subset shipped inside the package
(`edm_lit/assets/fashion_mnist_subset.npz`: 400 training and 100 test images per class). `source="download"`
asks torchvision to download the full set on a machine that has internet.
"""
from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ['DEBIAN_FASHION_MNIST', 'EMBEDDED_SUBSET', 'FASHION_MNIST_CLASSES', 'DataError', 'ImageSet', 'read_idx',
           'load_fashion_mnist', 'to_model_range', 'default_root', 'build_embedded_subset']

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
EMBEDDED_SUBSET = Path(__file__).parent / 'assets' / 'fashion_mnist_subset.npz'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_IDX_FILES = {True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
              False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_SOURCES = ('auto', 'debian', 'torchvision', 'download', 'embedded')


class DataError(ValueError):
    """A data file is missing, truncated or not what it claims to be; the message names the path."""


@dataclass(frozen=True)
class ImageSet:
    """Images in [-1, 1], shape (N, C, H, W), with int64 labels and the name of the source they came from."""
    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self): return len(self.images)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic, dims, raw uint8 data), gzipped or not, checking its header."""
    path = Path(path)
    if not path.is_file(): raise DataError(f'IDX file not found: {path}')
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f: buf = f.read()
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f'cannot read IDX file {path}: {e}') from e
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise DataError(f'{path} is not an unsigned-byte IDX file (bad magic number {buf[:4].hex()!r})')
    ndim = buf[3]
    if len(buf) < 4 + 4 * ndim: raise DataError(f'{path}: header truncated ({len(buf)} bytes)')
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    offset, need = 4 + 4 * ndim, int(np.prod(shape, dtype=np.int64))
    if len(buf) - offset != need:
        raise DataError(f'{path}: header says shape {shape} ({need} bytes) but the file holds {len(buf) - offset} bytes')
    return np.frombuffer(buf, dtype=np.uint8, offset=offset).reshape(shape)


def to_model_range(images_uint8, pad_to_32: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 in [-1, 1], shape (N, C, H, W); optionally padded to 32x32."""
    x = torch.from_numpy(np.array(images_uint8))  # a writable copy
    if x.dtype != torch.uint8: raise DataError(f'expected uint8 images, got {x.dtype}')
    if x.ndim == 3: x = x[:, None]
    if x.ndim != 4: raise DataError(f'expected images of shape (N, H, W) or (N, C, H, W), got {tuple(x.shape)}')
    x = x.float() / 127.5 - 1
    if pad_to_32:
        ph, pw = 32 - x.shape[-2], 32 - x.shape[-1]
        if ph < 0 or pw < 0: raise DataError(f'cannot pad images of size {tuple(x.shape[-2:])} to 32x32')
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
    return x


def _idx_pair(folder: Path, train: bool):
    """Find the image/label IDX files (plain or .gz) of one split in `folder`; None when absent."""
    found = []
    for stem in _IDX_FILES[train]:
        cands = [folder / stem, folder / f'{stem}.gz']
        hit = next((p for p in cands if p.is_file()), None)
        if hit is None: return None
        found.append(hit)
    return found


def _from_idx(folder: Path, train: bool, name: str):
    pair = _idx_pair(folder, train)
    if pair is None: return None
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f'{pair[0]} / {pair[1]}: images {images.shape} and labels {labels.shape} do not match')
    return images, labels, name


def _from_embedded(train: bool):
    if not EMBEDDED_SUBSET.is_file(): raise DataError(f'embedded subset missing: {EMBEDDED_SUBSET}')
    split = 'train' if train else 'test'
    try:
        with np.load(EMBEDDED_SUBSET) as z: return z[f'{split}_images'], z[f'{split}_labels'], 'embedded'
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f'embedded subset {EMBEDDED_SUBSET} is corrupt: {e}') from e


def _from_torchvision(root: Path, train: bool, download: bool):
    raw = root / 'FashionMNIST' / 'raw'
    if not download: return _from_idx(raw, train, 'torchvision')
    from torchvision.datasets import FashionMNIST  # imported here: only this path needs torchvision
    ds = FashionMNIST(str(root), train=train, download=True)
    return ds.data.numpy(), ds.targets.numpy(), 'torchvision'


def default_root() -> Path:
    """Where torchvision downloads go: $EDM_LIT_DATA, else ~/.cache/edm_lit."""
    return Path(os.environ.get('EDM_LIT_DATA', Path.home() / '.cache' / 'edm_lit'))


def load_fashion_mnist(train: bool = True, source: str = 'auto', root=None, pad_to_32: bool = False,
                       limit: int | None = None) -> ImageSet:
    """Fashion-MNIST as an `ImageSet` in [-1, 1]; `source` is one of auto, debian, torchvision, download, embedded."""
    if source not in _SOURCES: raise ValueError(f'unknown source {source!r}; expected one of {_SOURCES}')
    if limit is not None and limit < 1: raise ValueError(f'limit must be a positive number of images, got {limit}')
    root = Path(root) if root is not None else default_root()
    got = None
    if source in ('auto', 'debian'): got = _from_idx(DEBIAN_FASHION_MNIST, train, 'debian')
    if got is None and source in ('auto', 'torchvision', 'download'):
        got = _from_torchvision(root, train, download=source == 'download')
    if got is None and source in ('auto', 'embedded'): got = _from_embedded(train)
    if got is None: raise DataError(f'Fashion-MNIST not found for source={source!r} (looked in {DEBIAN_FASHION_MNIST} '
                                    f'and {root / "FashionMNIST" / "raw"}); use source="download" or "embedded"')
    images, labels, name = got
    if limit is not None: images, labels = images[:limit], labels[:limit]
    return ImageSet(to_model_range(images, pad_to_32), torch.from_numpy(np.array(labels, dtype=np.int64)), name)


def build_embedded_subset(out=EMBEDDED_SUBSET, per_class_train: int = 400, per_class_test: int = 100,
                          folder=DEBIAN_FASHION_MNIST):
    """Rebuild the embedded subset: the first `per_class_*` images of each class, in file order, of each split."""
    arrays = {}
    for train, k in ((True, per_class_train), (False, per_class_test)):
        got = _from_idx(Path(folder), train, 'idx')
        if got is None: raise DataError(f'no Fashion-MNIST IDX files in {folder}')
        x, y, _ = got
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)]))
        split = 'train' if train else 'test'
        arrays[f'{split}_images'], arrays[f'{split}_labels'] = x[keep], y[keep]
    np.savez_compressed(out, **arrays)
    return {k: v.shape for k, v in arrays.items()}
