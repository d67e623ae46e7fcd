"""Training image sets: Fashion-MNIST, CIFAR-10 and a folder of images (plain module, not generated).

Every loader returns an `edm_lit.data.ImageSet`: float32 images in [-1, 1] of shape (N, C, R, R) and int64 labels
(an image folder has no classes: its labels are all 0 and `num_classes` is 0). Problems a user can cause — an empty
folder, a file that is not an image, images of different sizes without a transform, a missing CIFAR-10 download —
raise `edm_lit.data.DataError` naming the path. Used by the training loop of chapter 9 and by `edm-lit train`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import DataError, ImageSet, default_root, load_fashion_mnist, to_model_range

__all__ = ['DATASETS', 'TRANSFORMS', 'NUM_CLASSES', 'load_cifar10', 'load_image_folder', 'load_dataset']

DATASETS = ('fashion-mnist', 'cifar10', 'folder')
TRANSFORMS = ('resize', 'center-crop')
NUM_CLASSES = {'fashion-mnist': 10, 'cifar10': 10, 'folder': 0}


def _cifar10(root: Path, train: bool, download: bool):
    from torchvision.datasets import CIFAR10  # imported here: only this loader needs torchvision
    return CIFAR10(str(root), train=train, download=download)


def load_cifar10(root=None, train: bool = True, download: bool = True) -> ImageSet:
    """CIFAR-10 (32x32 RGB, 10 classes) from torchvision's `cifar-10-batches-py` under `root`, downloading if absent."""
    root = Path(root) if root is not None else default_root()
    try: ds = _cifar10(root, train, download=False)  # the files already there, checked against their MD5 sums
    except RuntimeError as first:
        if not download:
            raise DataError(f'CIFAR-10 not found or corrupt in {root / "cifar-10-batches-py"} ({first})') from first
        try: ds = _cifar10(root, train, download=True)
        except (RuntimeError, OSError) as e:  # no network, disk full, bad archive
            raise DataError(f'CIFAR-10 is not in {root / "cifar-10-batches-py"} and downloading it failed: {e}') from e
    images = np.asarray(ds.data).transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return ImageSet(to_model_range(images), torch.as_tensor(ds.targets, dtype=torch.int64), 'cifar10')


def _image_files(folder: Path, exclude=()) -> list[Path]:
    if not folder.is_dir(): raise DataError(f'image folder not found: {folder}')
    skip = {folder / name for name in exclude}
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p not in skip
                   and not any(s.startswith('.') for s in p.relative_to(folder).parts))
    if not files: raise DataError(f'image folder {folder} is empty (expected PNG/JPEG/... files)')
    return files


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f'{path} is not a readable image file ({e})') from e


def _center_crop(im):
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _to_array(im, mode: str, resolution: int | None, transform: str | None) -> np.ndarray:
    im = im.convert(mode)
    if transform == 'center-crop': im = _center_crop(im)
    if transform is not None and im.size != (resolution, resolution):
        from PIL import Image
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _check_sizes(files, sizes, resolution):
    first = sizes[0]
    for path, size in zip(files, sizes):
        if size != first:
            raise DataError(f'images differ in size: {files[0]} is {first[0]}x{first[1]} but {path} is '
                            f'{size[0]}x{size[1]}; pass a transform ({" or ".join(TRANSFORMS)}) and a resolution')
    if first[0] != first[1]:
        raise DataError(f'images in {files[0].parent} are {first[0]}x{first[1]}, not square; use a transform')
    if resolution is not None and first[0] != resolution:
        raise DataError(f'images in {files[0].parent} are {first[0]}x{first[1]}, not the requested '
                        f'{resolution}x{resolution}; pass a transform ({" or ".join(TRANSFORMS)})')


def load_image_folder(folder, resolution: int | None = None, transform: str | None = None,
                      exclude=()) -> ImageSet:
    """Every image under `folder` (recursively, sorted by path) as an `ImageSet`; gray if all are gray, else RGB.

    `exclude`: paths relative to `folder` to leave out (e.g. the grid.png that `edm-lit sample` writes).
    transform=None needs square images of one size (equal to `resolution` if given); 'resize' scales each image to
    resolution x resolution; 'center-crop' cuts the central square, then scales it.
    """
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f'unknown transform {transform!r}; expected one of {TRANSFORMS} or None')
    if transform is not None and (resolution is None or resolution < 1):
        raise ValueError(f'transform {transform!r} needs a positive resolution, got {resolution}')
    files = _image_files(Path(folder), exclude)
    images = [_open_image(p) for p in files]
    if transform is None: _check_sizes(files, [im.size for im in images], resolution)
    mode = 'L' if all(im.mode in ('1', 'L', 'I;16', 'I') for im in images) else 'RGB'
    arrays = np.stack([_to_array(im, mode, resolution, transform) for im in images])
    return ImageSet(to_model_range(arrays), torch.zeros(len(files), dtype=torch.int64), f'folder:{folder}')


def load_dataset(name: str, path=None, resolution: int | None = None, transform: str | None = None) -> ImageSet:
    """Dispatch on `name` in DATASETS: 'fashion-mnist' (padded to 32x32), 'cifar10' or 'folder' (`path` needed).

    Fashion-MNIST and CIFAR-10 can be averaged down to a `resolution` dividing 32 (16, 8, ...) for quick CPU runs.
    """
    if name not in DATASETS: raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')
    if name == 'folder':
        if path is None: raise ValueError("dataset 'folder' needs a path to a folder of images")
        return load_image_folder(path, resolution, transform)
    if transform is not None or (resolution is not None and (resolution < 1 or 32 % resolution)):
        raise ValueError(f'{name} is 32x32 (smaller sizes by averaging: 16, 8, ...); got resolution={resolution}, '
                         f'transform={transform!r}')
    data = load_cifar10(path) if name == 'cifar10' else load_fashion_mnist(train=True, root=path, pad_to_32=True)
    if resolution in (None, 32): return data
    return ImageSet(torch.nn.functional.avg_pool2d(data.images, 32 // resolution), data.labels, data.source)
