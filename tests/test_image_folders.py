"""Image folders: every mode and bit depth Pillow reads is decoded (or refused by name), symlinked folders are
followed without looping, and oversized images are refused by name before they are decoded."""
import numpy as np
import pytest
import torch
from PIL import Image

from edm_lit import datasets
from edm_lit.data import DataError

from test_bad_inputs import png_header


def test_16_bit_gray_png_keeps_its_values(tmp_path):
    v16 = (np.arange(64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 ... 65520
    Image.fromarray(v16).save(tmp_path / 'a.png')
    assert Image.open(tmp_path / 'a.png').mode == 'I;16'
    got = datasets.load_image_folder(tmp_path).images
    v8 = np.round(v16 / 257).astype(np.float32)  # 65535 -> 255
    assert got.shape == (1, 1, 8, 8)
    torch.testing.assert_close(got[0, 0], torch.from_numpy(v8 / 127.5 - 1), rtol=0, atol=1e-6)


RGB = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize('mode, fmt, channels', [
    ('1', 'png', 1), ('L', 'png', 1), ('LA', 'png', 1), ('P', 'png', 3), ('PA', 'tiff', 3), ('RGB', 'png', 3),
    ('RGBA', 'png', 3), ('CMYK', 'jpeg', 3), ('CMYK', 'tiff', 3), ('YCbCr', 'tiff', 3), ('LAB', 'tiff', 3),
    ('I;16B', 'tiff', 1), ('RGB', 'webp', 3), ('L', 'bmp', 1)])
def test_every_mode_is_decoded(tmp_path, mode, fmt, channels):
    path = tmp_path / f'x.{fmt}'
    Image.fromarray(RGB).convert(mode).save(path)
    got = datasets.load_image_folder(tmp_path).images
    with Image.open(path) as im:
        target = 'L' if channels == 1 else 'RGB'
        expect = np.asarray(im.convert(target) if not im.mode.startswith('I;16') else
                            Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8)))
    expect = expect[None] if expect.ndim == 2 else expect.transpose(2, 0, 1)
    assert got.shape == (1, channels, 8, 8)
    torch.testing.assert_close(got[0], torch.from_numpy(expect.astype(np.float32) / 127.5 - 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize('mode, what', [('I', "mode 'I'"), ('F', "mode 'F'")])
def test_modes_without_a_known_range_are_refused_by_name(tmp_path, mode, what):
    Image.fromarray(RGB).convert('L').convert(mode).save(tmp_path / 'x.tiff')
    with pytest.raises(DataError, match=f'{tmp_path / "x.tiff"}: {what}'):
        datasets.load_image_folder(tmp_path)


def test_gray_16_bit_and_rgb_together_become_rgb(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / 'a.png')
    Image.new('RGB', (4, 4), (0, 0, 0)).save(tmp_path / 'b.png')
    got = datasets.load_image_folder(tmp_path).images
    assert got.shape == (2, 3, 4, 4) and got[0].min() == 1.0 and got[1].max() == -1.0


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'elsewhere').mkdir()
    Image.new('L', (4, 4), 0).save(tmp_path / 'data' / 'a.png')
    Image.new('L', (4, 4), 255).save(tmp_path / 'elsewhere' / 'b.png')
    (tmp_path / 'data' / 'more').symlink_to(tmp_path / 'elsewhere', target_is_directory=True)
    (tmp_path / 'data' / 'loop').symlink_to(tmp_path / 'data', target_is_directory=True)
    (tmp_path / 'elsewhere' / 'back').symlink_to(tmp_path / 'data', target_is_directory=True)
    got = datasets.load_image_folder(tmp_path / 'data').images
    assert got.shape == (2, 1, 4, 4) and got[0].max() == -1.0 and got[1].min() == 1.0


def test_oversized_images_are_refused_by_name_before_decoding(tmp_path):
    Image.new('L', (4, 4), 0).save(tmp_path / 'a.png')
    png_header(tmp_path / 'huge.png', 15000, 15000)
    with pytest.raises(DataError, match=f'{tmp_path / "huge.png"} is 15000x15000 = 225,000,000 pixels'):
        datasets.load_image_folder(tmp_path, resolution=4, transform='resize')
