"""The `edm-lit` command: help, argument errors (exit 2), run errors (exit 1) with clear messages, and a small
train -> resume -> info -> sample round trip on an image folder."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit import checkpoints, cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name('edm-lit')



def _run(capsys, *argv):
    """cli.main in this process: (exit status, stdout, stderr); argparse errors become status 2."""
    try: code = cli.main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.skipif(not SCRIPT.exists(), reason='console script not installed (pip install -e .)')
def test_console_script_help_and_a_bad_value():
    out = subprocess.run([str(SCRIPT), 'train', '--help'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ('--dataset', '--preset', '--batch', '--duration', '--steps', '--lr', '--ema', '--seed', '--outdir',
                 '--resume', '--precision', '--compile', '--channels-last', '--checkpoint-every', '--grid-every'):
        assert flag in out.stdout, flag
    bad = subprocess.run([str(SCRIPT), 'train', '--batch', '-4'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument --batch: expected a positive integer, got '-4'" in bad.stderr


def test_top_level_help(capsys):
    code, out, _ = _run(capsys, '--help')
    assert code == 0 and all(c in out for c in ('train', 'sample', 'eval', 'info', 'export', 'convert', 'phema'))


@pytest.mark.parametrize('command', ['', 'train', 'sample', 'eval', 'info', 'export', 'convert', 'phema'])
def test_help_of_every_subcommand(capsys, command):
    """argparse %-formats help strings: a bare % in one made `sample --help` crash with a TypeError."""
    code, out, err = _run(capsys, *([command] if command else []), '--help')
    assert code == 0 and out.startswith(f'usage: edm-lit {command}'.rstrip()) and not err, err


def test_python_m_runs_the_package():
    """`python -m edm_lit.cli` (and so `torchrun -m edm_lit.cli`) runs the package's __main__."""
    out = subprocess.run([sys.executable, '-m', 'edm_lit.cli', 'sample', '--help'], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and 'default: seed % classes' in out.stdout, out.stderr


@pytest.mark.parametrize('argv, message', [
    (['train', '--batch', '0'], "--batch: expected a positive integer, got '0'"),
    (['train', '--preset', 'resnet'], "--preset: invalid choice: 'resnet'"),
    (['train', '--dataset', 'imagenet'], "--dataset: invalid choice: 'imagenet'"),
    (['train', '--duration', '12x'], "--duration: expected a count of images like 5000, 10k or 0.5M, got '12x'"),
    (['train', '--duration', '1M', '--steps', '5'], 'not allowed with argument'),
    (['train', '--lr', 'nan'], "--lr: expected a learning rate in (0, 1], got 'nan'"),
    (['train', '--augment', '1.5'], "--augment: expected a probability in [0, 1], got '1.5'"),
    (['train', '--seed', '-1'], "--seed: expected an integer >= 0, got '-1'"),
    (['sample', 'x', '--outdir', 'y', '--seeds', '9-3'], "expected seeds like 0-63 or 1,5,10-12, got '9-3'"),
    (['sample', 'x', '--outdir', 'y', '--sampler', 'dpm'], "--sampler: invalid choice: 'dpm'"),
    (['sample', 'x', '--outdir', 'y', '--S-noise', '-1'], "--S-noise: expected a finite number >= 0, got '-1'"),
    (['eval', 'x', '--features', 'incept'], "--features: invalid choice: 'incept'"),
    (['eval', 'x', '--n', '0'], "--n: expected a positive integer, got '0'"),
    (['eval', 'x', '--n', '8', '--seeds', '0-7'], 'not allowed with argument'),
])
def test_bad_arguments_exit_2_naming_the_value(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err, err


def test_parsers_exact_values():
    assert cli.parse_count('200M') == 200_000_000 and cli.parse_count('0.5M') == 500_000
    assert cli.parse_count('10k') == 10_000 and cli.parse_count('64') == 64
    assert cli.parse_seeds('0-3,7,10-11') == [0, 1, 2, 3, 7, 10, 11]
    from edm_lit.cli.args import format_seeds
    assert format_seeds([0, 1, 2, 3, 7, 10, 11]) == '0-3,7,10-11' and format_seeds([5]) == '5'
    assert cli.parse_seeds(format_seeds([9, 2, 3, 4])) == [9, 2, 3, 4]  # order kept


def test_run_errors_exit_1_naming_the_path(capsys, tmp_path):
    code, _, err = _run(capsys, 'info', tmp_path / 'missing.json')
    assert code == 1 and f'checkpoint not found: {tmp_path / "missing.json"}' in err
    code, _, err = _run(capsys, 'sample', tmp_path, '--outdir', tmp_path / 'out')
    assert code == 1 and f'no checkpoint (training-state-*.json) in {tmp_path}' in err
    (tmp_path / 'empty').mkdir()
    code, _, err = _run(capsys, 'train', '--dataset', 'folder', '--data', tmp_path / 'empty', '--preset',
                        'ddpmpp-small', '--outdir', tmp_path / 'run')
    assert code == 1 and f'image folder {tmp_path / "empty"} is empty' in err
    code, _, err = _run(capsys, 'train', '--dataset', 'fashion-mnist', '--outdir', tmp_path / 'run')
    assert code == 1 and 'a new run needs --dataset, --preset and --outdir' in err


def test_corrupt_and_truncated_checkpoints_exit_1_naming_the_file(capsys, tmp_path):
    net = torch.nn.Linear(3, 3)
    path = checkpoints.save_training_state(tmp_path, 7, net, net, torch.optim.Adam(net.parameters()), {'config': {}})
    st, js = checkpoints.checkpoint_paths(path)
    st.write_bytes(st.read_bytes()[:-10])
    for command in ('info', 'sample'):
        code, _, err = _run(capsys, command, tmp_path, *(['--outdir', tmp_path / 'o'] if command == 'sample' else []))
        assert code == 1 and f'checkpoint {st} is corrupt or truncated' in err, err
    js.write_text(js.read_text()[:50])
    code, _, err = _run(capsys, 'train', '--resume', tmp_path)
    assert code == 1 and f'checkpoint {js} is corrupt or truncated (not valid JSON' in err, err
    assert not (tmp_path / 'o').exists()


def _folder(tmp_path, n=12, size=(12, 10)):
    """n random RGB images of one non-square size: the run must center-crop or resize them."""
    from PIL import Image
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f'{i:02d}.png')
    return folder


def test_train_resume_info_sample_round_trip(capsys, tmp_path):
    run = tmp_path / 'run'
    code, out, err = _run(capsys, 'train', '--dataset', 'folder', '--data', _folder(tmp_path), '--resolution', 8,
                          '--transform', 'center-crop', '--preset', 'ddpmpp-small', '--batch', 4, '--steps', 4,
                          '--lr-rampup', 0, '--checkpoint-every', 2, '--log-every', 1, '--outdir', run, '--quiet')
    assert code == 0, err
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ['training-state-00000002.json',
                                                                  'training-state-00000004.json']
    code, _, err = _run(capsys, 'train', '--dataset', 'folder', '--data', tmp_path, '--preset', 'ddpmpp-small',
                        '--outdir', run)
    assert code == 1 and f'{run} already holds checkpoints; continue with --resume' in err
    code, _, err = _run(capsys, 'train', '--resume', run, '--preset', 'ddpmpp-cifar10')
    assert code == 1 and '--preset cannot change when resuming' in err
    code, _, err = _run(capsys, 'train', '--resume', run, '--steps', 6, '--quiet')
    assert code == 0, err
    records = [json.loads(s) for s in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]['nimg'] == 24
    code, out, _ = _run(capsys, 'info', run)
    info = json.loads(out)
    assert code == 0 and info['step'] == 6 and info['nimg'] == 24 and info['config']['batch_size'] == 4
    assert info['model']['overrides'] == dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0,
                                              augment_dim=0)
    assert info['data']['transform'] == 'center-crop' and info['data']['num_images'] == 12
    code, out, err = _run(capsys, 'sample', run, '--seeds', '0-3', '--steps', 3, '--outdir', tmp_path / 's')
    assert code == 0, err
    from PIL import Image
    pngs = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / 's').iterdir()}
    assert sorted(pngs) == ['000000.png', '000001.png', '000002.png', '000003.png', 'grid.png']
    assert pngs['000002.png'].shape == (8, 8, 3) and pngs['grid.png'].shape == (16, 16, 3)  # a 2 x 2 grid
    assert np.array_equal(pngs['grid.png'][:8, 8:], pngs['000001.png'])
    code, _, err = _run(capsys, 'sample', run, '--seeds', '2', '--steps', 3, '--outdir', tmp_path / 'alone')
    alone = np.asarray(Image.open(tmp_path / 'alone' / '000002.png')).astype(int)
    assert np.abs(alone - pngs['000002.png']).max() <= 1  # one seed per image: the batch around it does not matter
    code, _, err = _run(capsys, 'sample', run, '--class', 3, '--outdir', tmp_path / 'c')
    assert code == 1 and '--class 3 given, but the model' in err
    for solver in ('dpmpp_2m', 'ipndm'):  # the multistep solvers of chapter 11 share the per-seed latents
        code, _, err = _run(capsys, 'sample', run, '--seeds', '0-3', '--steps', 3, '--sampler', solver,
                            '--outdir', tmp_path / solver)
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / solver).iterdir()) == sorted(pngs)
    code, _, err = _run(capsys, 'sample', run, '--sampler', 'ipndm', '--S-churn', 5, '--outdir', tmp_path / 'bad')
    assert code == 1 and "apply to heun and churn only, not to 'ipndm'" in err


def test_info_counts_the_official_parameters(capsys, tmp_path):
    """DDPM++ at the CIFAR-10 configuration has 55,733,891 parameters (official code, unconditional, augment_dim 9)."""
    from edm_lit.networks import make_network
    from edm_lit.precond import EDMPrecond
    model = dict(preset='ddpmpp-cifar10', overrides=dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0,
                                                         augment_dim=9))
    net = EDMPrecond(make_network(model['preset'], **model['overrides']))
    checkpoints.save_training_state(tmp_path, 0, net, net, torch.optim.Adam(net.parameters()),
                                    dict(model=model, data={}, config={}, nimg=0, world_size=1))
    del net
    code, out, err = _run(capsys, 'info', tmp_path)
    assert code == 0, err
    assert json.loads(out)['parameters'] == 55_733_891


def test_a_huge_class_and_eval_out_over_an_earlier_record(tmp_path):
    from edm_lit.cli.eval import EVAL_KEYS, check_out
    from edm_lit.cli.sample import class_labels
    with pytest.raises(ValueError, match='--class 99999999999999999999 is not in 0..9'):
        class_labels(10, [0, 1], 99999999999999999999)
    assert class_labels(10, [0, 1], 3).argmax(1).tolist() == [3, 3]
    old = tmp_path / 'eval.json'
    old.write_text(json.dumps(dict.fromkeys(EVAL_KEYS, 0)))
    check_out(old)  # an earlier eval record may be replaced; a new name is fine too
    check_out(tmp_path / 'new.json')
    with pytest.raises(ValueError, match='is a folder'): check_out(tmp_path)


def test_label_dropout_channels_and_export(capsys, tmp_path):
    """--cond --label-dropout and --channels reach the model record; they cannot change on resume; `export` writes
    the EMA weights alone (a quarter of the training checkpoint here: no raw weights, no Adam moments), and sampling
    from the export gives the same images as sampling from the run."""
    run = tmp_path / 'run'
    base = ['train', '--dataset', 'fashion-mnist', '--data', tmp_path / 'none', '--resolution', 8, '--preset',
            'ddpmpp-small', '--batch', 4, '--steps', 2, '--lr-rampup', 0, '--quiet']
    code, _, err = _run(capsys, *base, '--label-dropout', 0.2, '--outdir', tmp_path / 'uncond')
    assert code == 1 and '--label-dropout 0.2 needs --cond' in err and not (tmp_path / 'uncond').exists(), err
    code, _, err = _run(capsys, *base, '--cond', '--label-dropout', 0.2, '--channels', 8, '--outdir', run)
    assert code == 0, err
    code, out, _ = _run(capsys, 'info', run)
    info = json.loads(out)
    assert info['model']['overrides']['label_dropout'] == 0.2 and info['model']['overrides']['model_channels'] == 8
    assert info['model']['overrides']['label_dim'] == 10 and info['data']['cond'] is True
    for flag in (['--label-dropout', 0.1], ['--channels', 16]):
        code, _, err = _run(capsys, 'train', '--resume', run, '--steps', 3, *flag)
        assert code == 1 and f'{flag[0]} cannot change when resuming' in err, err
    code, out, err = _run(capsys, 'export', run, tmp_path / 'model')
    assert code == 0 and 'ema weights' in out, err
    exported = checkpoints.list_checkpoints(tmp_path / 'model')
    assert [p.name for p in exported] == ['training-state-00000002.json']
    tensors, meta = checkpoints.load_checkpoint(exported[0])
    full, _ = checkpoints.load_checkpoint(checkpoints.find_latest(run))
    assert set(tensors) == {k for k in full if k.startswith('ema.')}
    assert all(torch.equal(tensors[k], full[k]) for k in tensors)
    assert meta['model'] == info['model'] and meta['exported_from']['weights'] == 'ema'
    code, out, err = _run(capsys, 'export', run, tmp_path / 'raw', '--weights', 'net')
    raw, _ = checkpoints.load_checkpoint(checkpoints.find_latest(tmp_path / 'raw'))
    assert code == 0 and all(torch.equal(raw['ema.' + k[4:]], v) for k, v in full.items() if k.startswith('net.'))
    for src, name in ((run, 'a'), (tmp_path / 'model', 'b')):
        code, _, err = _run(capsys, 'sample', src, '--seeds', '0-1', '--steps', 2, '--outdir', tmp_path / name)
        assert code == 0, err
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'a' / 'grid.png')),
                          np.asarray(Image.open(tmp_path / 'b' / 'grid.png')))
    for argv, message in [([run, tmp_path / 'model'], f'{tmp_path / "model"} already holds checkpoints'),
                          ([run, run], f'{run} already holds checkpoints'),  # never into a run folder
                          ([tmp_path / 'nothing', tmp_path / 'x'], 'not found')]:
        code, _, err = _run(capsys, 'export', *argv)
        assert code == 1 and message in err and 'Traceback' not in err, (argv, err)
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'model', '--steps', 4, '--quiet')
    assert code == 1 and 'holds no training state to resume' in err and 'Traceback' not in err, err
