"""`edm-lit train --phema` and `edm-lit phema` (chapter 14 on real runs): the snapshots are the power-function averages
of the raw weights step by step (checked against the weights of every step), survive an interrupted run bit for bit,
and rebuild a stored width exactly; bad flags and folders are refused by name. Also the VP and VE columns of
Table 1 (`--precond`, `--loss`) that the training ladder (Table 2) needs."""
import math

import pytest
import torch

from edm_lit import checkpoints, cli
from edm_lit.phema import std_to_exp

TRAIN = ('train', '--dataset', 'folder', '--resolution', 8, '--transform', 'center-crop', '--preset', 'ddpmpp-small',
         '--batch', 4, '--lr', 2e-3, '--lr-rampup', 0, '--ema', '1k', '--device', 'cpu', '--quiet', '--data', 'images')


def _run(capsys, *argv):
    try: code = cli.main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


pytestmark = pytest.mark.usefixtures('images')  # tests/conftest.py: 12 images in tmp_path/images


def _tensors(path, prefix):
    tensors, _ = checkpoints.load_checkpoint(path)
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + '.')}


def test_snapshots_are_power_averages_of_every_steps_weights(capsys, tmp_path):
    run, K = tmp_path / 'run', 6
    code, _, err = _run(capsys, *TRAIN, '--steps', K, '--checkpoint-every', 1, '--keep', 0, '--phema', 0.05, 0.1,
                        '--phema-every', 1, '--outdir', run)
    assert code == 0, err
    nets = [_tensors(run / f'training-state-{k:08d}.json', 'net') for k in range(1, K + 1)]  # theta_1..theta_K
    params = {k for k, v in nets[0].items() if v.is_floating_point()}
    for s in (0.05, 0.1):
        g = std_to_exp(s)
        w = [(k / K) ** (g + 1) - ((k - 1) / K) ** (g + 1) for k in range(1, K + 1)]  # eq-phema-weights
        snap = _tensors(run / f'phema-{s:.3f}' / f'training-state-{K:08d}.json', 'ema')
        assert set(snap) == set(nets[0])
        for name in params:
            expected = sum(wk * net[name].double() for wk, net in zip(w, nets))
            assert torch.allclose(snap[name].double(), expected, rtol=1e-5, atol=1e-6), (s, name)
    meta = checkpoints.read_meta(run / 'phema-0.050' / f'training-state-{K:08d}.json')
    assert meta['phema']['sigma_rel'] == 0.05 and math.isclose(meta['phema']['gamma'], std_to_exp(0.05))
    assert meta['nimg'] == K * 4 and 'model' in meta


def test_interrupted_run_keeps_its_averages_and_phema_rebuilds_a_stored_width(capsys, tmp_path):
    flags = ('--checkpoint-every', 4, '--phema', 0.05, 0.1, '--phema-every', 2)
    code, _, err = _run(capsys, *TRAIN, '--steps', 8, *flags, '--outdir', tmp_path / 'whole')
    assert code == 0, err
    code, _, err = _run(capsys, *TRAIN, '--steps', 4, *flags, '--outdir', tmp_path / 'cut')
    assert code == 0, err
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'cut', '--steps', 8, '--quiet')
    assert code == 0, err
    for s in ('0.050', '0.100'):
        for step in (6, 8):
            a, b = (_tensors(tmp_path / r / f'phema-{s}' / f'training-state-{step:08d}.json', 'ema')
                    for r in ('whole', 'cut'))
            assert all(torch.equal(a[k], b[k]) for k in a), (s, step)
    code, out, err = _run(capsys, 'phema', tmp_path / 'whole', tmp_path / 'p10', '--sigma-rel', 0.1)
    assert code == 0 and 'from 8 snapshots' in out, err
    rebuilt = _tensors(tmp_path / 'p10' / 'training-state-00000008.json', 'ema')
    stored = _tensors(tmp_path / 'whole' / 'phema-0.100' / 'training-state-00000008.json', 'ema')
    assert all(torch.allclose(rebuilt[k].float(), stored[k].float(), atol=1e-6) for k in stored)
    code, out, err = _run(capsys, 'phema', tmp_path / 'whole', tmp_path / 'p07', '--sigma-rel', 0.07, '--step', 6)
    assert code == 0 and 'at step 6 from 6 snapshots' in out, err
    meta = checkpoints.read_meta(tmp_path / 'p07' / 'training-state-00000006.json')
    assert abs(sum(q['coefficient'] for q in meta['phema']['snapshots']) - 1) < 1e-9
    code, _, err = _run(capsys, 'sample', tmp_path / 'p07', '--seeds', '0-1', '--steps', 3, '--outdir', tmp_path / 's')
    assert code == 0, err


@pytest.mark.parametrize('extra, message', [
    (('--phema-every', 2), '--phema-every 2 needs --phema'),
    (('--phema', 0.05, '--phema-every', 3, '--checkpoint-every', 4), '--phema-every 3 must divide --checkpoint-every 4'),
    (('--phema', 0.05, 0.0501), 'widths must differ in their first three decimals'),
])
def test_bad_phema_flags_exit_1_naming_them(capsys, tmp_path, extra, message):
    code, _, err = _run(capsys, *TRAIN, '--steps', 2, *extra, '--outdir', tmp_path / 'run')
    assert code == 1 and message in err and 'Traceback' not in err, err
    assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


def test_phema_refusals(capsys, tmp_path):
    code, _, err = _run(capsys, *TRAIN, '--steps', 2, '--checkpoint-every', 2, '--outdir', tmp_path / 'plain')
    assert code == 0, err
    for argv, status, message in (
            (('phema', tmp_path / 'plain', tmp_path / 'o', '--sigma-rel', 0.1), 1, 'holds no post-hoc EMA snapshots'),
            (('phema', tmp_path / 'nowhere', tmp_path / 'o', '--sigma-rel', 0.1), 1, 'is not a run folder'),
            (('phema', tmp_path / 'plain', tmp_path / 'o', '--sigma-rel', 0.3), 2, 'expected a relative EMA width'),
            (('train', '--resume', tmp_path / 'plain', '--steps', 4, '--phema', 0.1), 1, 'cannot change when resuming')):
        code, _, err = _run(capsys, *argv)
        assert code == status and message in err and 'Traceback' not in err, (argv, err)
    code, _, err = _run(capsys, *TRAIN, '--steps', 4, '--checkpoint-every', 2, '--phema', 0.1, '--outdir', tmp_path / 'r')
    assert code == 0, err
    (tmp_path / 'r' / 'phema-0.100' / 'training-state-00000004.json').unlink()
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'r', '--steps', 6, '--quiet')
    assert code == 1 and 'needs the post-hoc EMA snapshot' in err, err
    code, _, err = _run(capsys, 'phema', tmp_path / 'r', tmp_path / 'o2', '--sigma-rel', 0.1, '--step', 3)
    assert code == 1 and '--step 3: no snapshot at that step' in err, err


def test_vp_and_ve_columns_train_resume_exactly_and_sample(capsys, tmp_path):
    """--precond / --loss pick Table 1's columns (the ladder of Table 2 needs VP and VE runs); both are recorded, a
    resumed run keeps them and ends bit-identical to one that never stopped, and the model samples."""
    for column in ('vp', 've'):
        flags = ('--precond', column, '--loss', column, '--checkpoint-every', 2)
        code, _, err = _run(capsys, *TRAIN, '--steps', 4, *flags, '--outdir', tmp_path / f'{column}-whole')
        assert code == 0, err
        code, _, err = _run(capsys, *TRAIN, '--steps', 2, *flags, '--outdir', tmp_path / f'{column}-cut')
        assert code == 0, err
        code, _, err = _run(capsys, 'train', '--resume', tmp_path / f'{column}-cut', '--steps', 4, '--quiet')
        assert code == 0, err
        paths = [tmp_path / f'{column}-{r}' / 'training-state-00000004.json' for r in ('whole', 'cut')]
        (a, meta), (b, _) = (checkpoints.load_checkpoint(p) for p in paths)
        assert meta['model']['precond'] == column and meta['loss'] == column
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(('net.', 'ema.')))
        code, _, err = _run(capsys, 'sample', paths[0], '--seeds', '0-1', '--steps', 3, '--outdir', tmp_path / column)
        assert code == 0, err
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'vp-whole', '--steps', 6, '--loss', 'edm')
    assert code == 1 and '--loss cannot change when resuming' in err, err
