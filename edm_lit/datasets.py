"""Training image sets: Fashion-MNIST, CIFAR-10 and a folder of images (plain module, not generated).

Every loader returns an `edm_lit.data.ImageSet`: float32 images in [-1, 1] of shape (N, C, R, R) and int64 labels
(an image folder has no classes: its labels are all 0 and `num_classes` is 0). An image folder is read recursively,
following symbolic links to folders (each real folder once); every mode and bit depth Pillow reads is decoded to
8 bits (16-bit gray: v * 255 / 65535, rounded), but 32-bit integer and floating-point images, whose range is unknown,
are refused. Problems a user can cause — an empty folder, a file that is not an image, a broken link, an image of
more than `edm_lit.validators.MAX_PIXELS` pixels, images of different sizes without a transform, a missing CIFAR-10
download — raise `edm_lit.data.DataError` naming the path. `fingerprint` identifies the images a run trains on. Used
by the training loop of chapter 9 and by `edm-lit train`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from . import validators
from .data import DataError, ImageSet, default_root, load_fashion_mnist, to_model_range

__all__ = ['DATASETS', 'TRANSFORMS', 'NUM_CLASSES', 'load_cifar10', 'load_image_folder', 'load_dataset',
           'fingerprint']

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


_GRAY = ('1', 'L', 'LA', 'La', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I;16S')  # modes read as one channel
_NO_RANGE = {'I': '32-bit integer', 'F': '32-bit floating-point'}


def _image_files(folder: Path, exclude=()) -> list[Path]:
    """Every file under `folder` but hidden ones, through symbolic links to folders, each real folder once."""
    if not folder.is_dir(): raise DataError(f'image folder not found: {folder}')
    skip, files, seen = {folder / name for name in exclude}, [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:  # a link back up the tree, or a second way into a folder
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for path in (Path(root, n) for n in names if not n.startswith('.')):
            if path in skip: continue
            if path.is_symlink() and not path.exists():
                raise DataError(f'{path} is a broken symbolic link (to {os.readlink(path)})')
            if not path.is_file(): raise DataError(f'{path} is not a regular file (expected an image)')
            files.append(path)
    if not files: raise DataError(f'image folder {folder} is empty (expected PNG/JPEG/... files)')
    return sorted(files)


@contextlib.contextmanager
def _opened(path: Path):
    """The image at `path`, opened lazily (header only), after checking its pixel count and mode."""
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours, lower, is checked instead (naming the file)
    try: im = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f'{path} is not a readable image file ({e})') from e
    finally: Image.MAX_IMAGE_PIXELS = limit
    with im:
        try: validators.check_pixels(path, *im.size)
        except ValueError as e: raise DataError(str(e)) from None
        if im.mode in _NO_RANGE:
            raise DataError(f'{path}: mode {im.mode!r} ({_NO_RANGE[im.mode]}) images have no fixed range of values; '
                            f'save it as an 8- or 16-bit image')
        yield im


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    with _opened(path) as im: return im.mode, im.size


def _decode(path: Path, mode: str):
    """The image at `path` in `mode` ('L' or 'RGB'), 8 bits per channel, from any mode and bit depth Pillow reads."""
    from PIL import Image
    with _opened(path) as im:
        try:
            im.load()
            if im.mode.startswith('I;16'):  # 16-bit gray: v * 255 / 65535, rounded
                v16 = np.asarray(im).astype(np.float64).clip(0, 65535)
                return Image.fromarray(np.round(v16 * (255 / 65535)).astype(np.uint8)).convert(mode)
            return im.convert(mode)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f'{path} is not a readable image file ({e})') from e


def _center_crop(im):
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _to_array(im, resolution: int | None, transform: str | None) -> np.ndarray:
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
    heads = [_header(p) for p in files]  # every file checked before any is decoded
    if transform is None: _check_sizes(files, [size for _, size in heads], resolution)
    mode = 'L' if all(m in _GRAY for m, _ in heads) else 'RGB'
    arrays = np.stack([_to_array(_decode(p, mode), resolution, transform) for p in files])
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


def fingerprint(data: ImageSet) -> str:
    """'sha256:<hex>' of the images and labels as loaded: any change of an image, a label or their order changes it
    (a resumed run checks that it trains on the images it started with)."""
    h = hashlib.sha256(repr((tuple(data.images.shape), str(data.images.dtype))).encode())
    h.update(data.images.contiguous().numpy().data)
    h.update(data.labels.contiguous().numpy().data)
    return 'sha256:' + h.hexdigest()
