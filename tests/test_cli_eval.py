"""`edm-lit eval`: FID and KID of a folder of PNGs (its grid.png left out) and of a tiny checkpoint's samples, the
JSON record, agreement with `edm_lit.metrics.evaluate`, and bad inputs (exit 1, or 2 for argparse) naming the value.
Domain features (the shipped classifier) and the embedded Fashion-MNIST subset only: each test takes seconds."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from edm_lit import checkpoints, cli
from edm_lit.data import load_fashion_mnist
from edm_lit.metrics import evaluate
from test_cli import _run  # cli.main in this process: (exit status, stdout, stderr)

REF = ['--reference', 'fashion-test', '--source', 'embedded']  # 1,000 test images: n <= 500
RESULT_KEYS = {'fid', 'kid', 'floor_fid', 'floor_kid', 'n', 'feature_net', 'feature_dim', 'reference', 'seed',
               'floor_reference',
               'num_subsets', 'max_subset_size', 'reference_source', 'reference_images', 'input', 'kind', 'seconds'}


def _pngs(folder, images: torch.Tensor, grid: bool = True):
    """Write uint8 images (N, 1, H, W) as 00.png, 01.png, ... and (as `edm-lit sample` does) their grid.png."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images): Image.fromarray(image[0].numpy()).save(folder / f'{i:02d}.png')
    if grid: cli.save_grid(images, folder / 'grid.png')  # a 4 x 4 tiling: 128 x 128, not a sample
    return folder


def _real(n, train=True, offset=1000):
    """n Fashion-MNIST images of the embedded subset as uint8 (N, 1, 32, 32), the way a PNG stores them."""
    x = load_fashion_mnist(train, source='embedded', pad_to_32=True).images[offset:offset + n]
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _finite_with_floor(r):
    assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
    assert all(math.isfinite(r[k]) for k in ('fid', 'kid', 'floor_fid', 'floor_kid'))
    assert r['feature_net'] == 'domain' and r['feature_dim'] == 128 and r['reference'] == 'fashion-test'
    assert r['reference_source'] == 'embedded' and r['reference_images'] == 1000


def test_eval_folder_leaves_out_the_grid_and_agrees_with_evaluate(capsys, tmp_path):
    """16 real training images + grid.png: the CLI's numbers are evaluate's on the 16 images read here with PIL."""
    folder = _pngs(tmp_path / 'samples', _real(16))
    code, out, err = _run(capsys, 'eval', folder, *REF, '--out', tmp_path / 'eval' / 'r.json')
    assert code == 0, err
    r = json.loads((tmp_path / 'eval' / 'r.json').read_text())
    _finite_with_floor(r)
    assert r['kind'] == 'folder' and r['num_images'] == 16 and r['n'] == 16 and r['excluded'] == ['grid.png']
    assert out == (f"FID {r['fid']:.4g} (floor {r['floor_fid']:.4g})  KID {r['kid']:.4g} (floor {r['floor_kid']:.4g})"
                   f"  n=16, domain features, vs fashion-test\n")
    files = sorted(p for p in folder.iterdir() if p.name != 'grid.png')
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p))[None] for p in files])).float() / 127.5 - 1
    direct = evaluate(images, 'fashion-test', n=16, source='embedded', device='cpu')
    assert r['fid'] == pytest.approx(direct['fid'], rel=1e-9) and r['kid'] == pytest.approx(direct['kid'], rel=1e-9)
    code, out, _ = _run(capsys, 'eval', folder, *REF, '--json', '--n', 8)  # --json: the record on stdout
    r8 = json.loads(out)
    assert code == 0 and r8['n'] == 8 and r8['num_images'] == 16


def test_eval_of_real_images_is_of_the_order_of_the_floor(capsys, tmp_path):
    """Held-out real images (training split vs the test reference) are a real-vs-real pair: FID ~ the floor."""
    code, out, err = _run(capsys, 'eval', _pngs(tmp_path / 'real', _real(24), grid=False), *REF, '--json')
    r = json.loads(out)
    assert code == 0 and r['excluded'] == [] and r['n'] == 24, err
    assert 0.5 < r['fid'] / r['floor_fid'] < 2, r  # at n = 24 both are dominated by the small-n bias (~1/n)


def _tiny_checkpoint(run, label_dim=10):
    """An untrained class-conditional DDPM++ for 1 x 32 x 32 images, 41k parameters: a few images a second."""
    model = dict(preset='ddpmpp-small', overrides=dict(img_resolution=32, in_channels=1, out_channels=1,
                                                      label_dim=label_dim, augment_dim=0, model_channels=16,
                                                      channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    torch.manual_seed(0)
    net = cli.build_net(model)
    return checkpoints.save_training_state(run, 3, net, net, torch.optim.Adam(net.parameters()),
                                           dict(model=model, data={}, config={}, nimg=12, world_size=1))


def test_eval_checkpoint_matches_sample_and_the_folder_it_saves(capsys, tmp_path):
    run = tmp_path / 'run'
    _tiny_checkpoint(run)
    code, out, err = _run(capsys, 'eval', run, *REF, '--seeds', '0-5', '--steps', 2, '--batch', 4,
                          '--save-images', tmp_path / 'saved', '--json')
    assert code == 0, err
    r = json.loads(out)
    _finite_with_floor(r)
    assert r['kind'] == 'checkpoint' and r['checkpoint'] == str(run / 'training-state-00000003.json')
    assert (r['step'], r['nimg'], r['weights'], r['sampler'], r['steps'], r['nfe']) == (3, 12, 'ema', 'heun', 2, 3)
    assert r['seeds'] == '0-5' and r['n'] == 6 and r['class_labels'] == 'seed % 10'
    code, _, err = _run(capsys, 'sample', run, '--seeds', '0-5', '--steps', 2, '--outdir', tmp_path / 'sampled')
    assert code == 0, err
    for name in [f'{i:06d}.png' for i in range(6)] + ['grid.png']:  # eval generates exactly what sample does
        assert np.array_equal(np.asarray(Image.open(tmp_path / 'saved' / name)),
                              np.asarray(Image.open(tmp_path / 'sampled' / name))), name
    code, out, err = _run(capsys, 'eval', tmp_path / 'sampled', *REF, '--json')  # the PNGs give the same numbers
    f = json.loads(out)
    assert code == 0 and f['num_images'] == 6 and f['excluded'] == ['grid.png'], err
    assert (f['fid'], f['kid'], f['floor_fid']) == pytest.approx((r['fid'], r['kid'], r['floor_fid']), rel=1e-9)
    code, out, err = _run(capsys, 'eval', run, *REF, '--n', 3, '--steps', 1, '--sampler', 'ipndm', '--json')
    r = json.loads(out)
    assert code == 0 and (r['seeds'], r['n'], r['nfe']) == ('0-2', 3, 1), err


def test_eval_bad_inputs_exit_1_naming_the_value(capsys, tmp_path):
    folder = _pngs(tmp_path / 'ok', _real(4))
    (tmp_path / 'empty').mkdir()
    only_grid = tmp_path / 'only-grid'
    only_grid.mkdir()
    cli.save_grid(_real(4), only_grid / 'grid.png')
    mixed = _pngs(tmp_path / 'mixed', _real(3))
    Image.new('L', (16, 16)).save(mixed / '01.png')
    rgb = tmp_path / 'rgb'
    rgb.mkdir()
    for i in range(3): Image.new('RGB', (32, 32), (i, 50, 90)).save(rgb / f'{i}.png')
    run = tmp_path / 'run'
    _tiny_checkpoint(run, label_dim=0)
    for argv, message in [
        ([tmp_path / 'missing'], f'{tmp_path / "missing"} not found: expected a checkpoint, a run directory or a '
                                 f'folder of images'),
        ([tmp_path / 'empty'], f'image folder {tmp_path / "empty"} is empty'),
        ([only_grid], f'image folder {only_grid} is empty'),  # the grid alone is no sample
        ([mixed], f'images differ in size: {mixed / "00.png"} is 32x32 but {mixed / "01.png"} is 16x16'),
        ([rgb], f'image folder {rgb} holds 3x32x32 (CxHxW) images; domain features need 32x32 images with 1 '
                f'channel(s); try --features inception'),
        ([folder, '--n', 5], 'n=5: need 2 <= n <= 4 (4 images, 1000 reference images'),
        ([run, '--n', 501], 'n=501 images: need 2 <= n <= 500 (the floor uses 2n reference images; '
                            '--floor-reference fashion-train lifts n to the whole reference set)'),
        ([run, '--n', 1001, '--floor-reference', 'fashion-train'],
         'n=1001 images: need 2 <= n <= 1000 (n reference and n floor-reference images)'),
        ([folder, '--floor-reference', 'fashion-test'], '--floor-reference fashion-test is the reference itself'),
        ([folder, '--floor-reference', tmp_path / 'nope'], f"--reference '{tmp_path / 'nope'}' is neither one of"),
        ([folder, '--steps', 4, '--seeds', '0-3'], f'--seeds, --steps: for a checkpoint only, but {folder} is a '
                                                   f'folder of images'),
        ([folder, '--reference', 'fashion-tset'], "--reference 'fashion-tset' is neither one of ['fashion-test', "
                                                  "'fashion-train'] nor an image folder"),
        ([folder, '--source', 'web'], "unknown source 'web'"),
    ]:
        extra = [] if '--reference' in argv or '--source' in argv else REF
        code, out, err = _run(capsys, 'eval', *argv, *extra)
        assert code == 1 and f'edm-lit eval: error: {message}' in err and not out, (argv, err)
        assert 'Traceback' not in err


def test_floor_reference_compares_whole_sets(capsys, tmp_path):
    """--floor-reference: the floor is n images of another set against the n reference images, so n can reach the
    whole reference set; a floor set equal to the reference gives FID 0 (up to rounding)."""
    test = load_fashion_mnist(False, source='embedded', pad_to_32=True).images
    same = evaluate(test[:40], test[:40], n=40, floor_reference=test[:40], device='cpu')
    assert same['fid'] == pytest.approx(0, abs=1e-3) and same['floor_fid'] == pytest.approx(0, abs=1e-3)
    assert same['floor_reference'] == 'tensor'
    split = evaluate(test[:40], test[:40], n=20, device='cpu')  # without it, n <= half the reference
    assert split['floor_reference'] is None and split['floor_fid'] > 0
    with pytest.raises(ValueError, match='n=40: need 2 <= n <= 20'): evaluate(test[:40], test[:40], n=40)
    folder = _pngs(tmp_path / 'real', _real(600), grid=False)  # 600 > 500: only with --floor-reference
    code, out, err = _run(capsys, 'eval', folder, *REF, '--floor-reference', 'fashion-train', '--json')
    r = json.loads(out)
    assert code == 0 and r['n'] == 600 and r['floor_reference'] == 'fashion-train', err
    assert r['floor_reference_source'] == 'embedded' and r['floor_reference_images'] == 4000
    assert 0.5 < r['fid'] / r['floor_fid'] < 2, r  # held-out training images against the test set: the floor's pair
