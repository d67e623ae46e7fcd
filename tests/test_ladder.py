"""The ablation ladder of Table 2 (chapter 9): `ladder_settings` against the paper's and Song et al.'s numbers, the two
loop settings config A needs (gradient clipping, dataset x-flips) against what they must do, and `edm-lit train
--config A..F --base vp|ve`: what each run records, exact resume with clipping and flips on, flags overriding the
config, and bad flags refused by name."""
import math

import pytest
import torch

from edm_lit import checkpoints, cli, train
from edm_lit.data import ImageSet

TRAIN = ('train', '--dataset', 'folder', '--resolution', 8, '--transform', 'center-crop', '--preset', 'ddpmpp-small',
         '--channels', 8, '--device', 'cpu', '--quiet', '--data', 'images')


def _run(capsys, *argv):
    try: code = cli.main([str(a) for a in argv])
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err




# ---- the settings, against the sources --------------------------------------------------------------------------

def test_config_a_is_song_et_al():
    vp, ve = train.ladder_settings('A', 'vp', pixels=3072), train.ladder_settings('A', 've', pixels=3072)
    for s in (vp, ve):
        t = s['train']
        assert (t['batch_size'], t['lr'], t['grad_clip'], t['xflip'], t['ema_rampup_ratio']) == (128, 2e-4, 1.0, True, None)
        assert t['lr_rampup_nimg'] == 5000 * 128 and s['dropout'] == 0.1 and s['augment'] == 0
        assert not s['redistribute'] and s['scale'] == 1
    # Song's EMA rates per step of 128 images: 0.9999 (VP) and 0.999 (VE); the half-life leaves half of the old value
    assert math.isclose(0.9999 ** (vp['train']['ema_halflife_nimg'] / 128), 0.5, rel_tol=1e-5)
    assert math.isclose(0.999 ** (ve['train']['ema_halflife_nimg'] / 128), 0.5, rel_tol=1e-4)
    assert (vp['precond'], vp['loss'], ve['precond'], ve['loss']) == ('vp', 'vp', 've', 've')
    # Song: VP averages the loss over pixels (reduce_mean), VE takes half the sum
    assert vp['train']['loss_scaling'] == 1 / 3072 and ve['train']['loss_scaling'] == 0.5
    assert 'loss_scaling' not in train.ladder_settings('A', 'vp')['train']  # pixels unknown: left to the caller
    assert vp['arch']['embedding_type'] == 'positional' and ve['arch']['embedding_type'] == 'fourier'


@pytest.mark.parametrize('base', ['vp', 've'])
def test_configs_b_to_f_change_one_thing_each(base):
    s = {c: train.ladder_settings(c, base) for c in train.LADDER}
    b = s['B']['train']
    assert (b['batch_size'], b['lr'], b['lr_rampup_nimg'], b['ema_halflife_nimg']) == (512, 1e-3, 10**7, 5 * 10**5)
    assert (b['grad_clip'], b['ema_rampup_ratio'], b['loss_scaling'], s['B']['dropout']) == (None, 0.05, 1.0, 0.13)
    assert [s[c]['redistribute'] for c in 'BCDEF'] == [False, True, True, True, True]
    assert [s[c]['precond'] for c in 'BCDEF'] == [base, base, 'edm', 'edm', 'edm']
    assert [s[c]['loss'] for c in 'BCDEF'] == [base, base, base, 'edm', 'edm']
    assert [s[c]['augment'] for c in 'BCDEF'] == [0, 0, 0, 0, 0.12]
    assert [s[c]['train']['xflip'] for c in 'BCDEF'] == [True, True, True, True, False]
    assert all(s[c]['train'] == {**b, 'xflip': s[c]['train']['xflip']} for c in 'CDEF')


def test_durations_scale_with_the_run():
    for config, base in (('A', 'vp'), ('B', 've'), ('F', 'vp')):
        full, small = train.ladder_settings(config, base), train.ladder_settings(config, base, total_nimg=2_000_000)
        assert small['scale'] == 0.01
        for k in ('lr_rampup_nimg', 'ema_halflife_nimg'):
            assert abs(small['train'][k] - full['train'][k] / 100) <= 0.5, k
        assert {k: v for k, v in small['train'].items() if k not in ('lr_rampup_nimg', 'ema_halflife_nimg')} == \
            {k: v for k, v in full['train'].items() if k not in ('lr_rampup_nimg', 'ema_halflife_nimg')}
    assert train.ladder_settings('B', total_nimg=10)['train']['ema_halflife_nimg'] == 1  # never zero


def test_redistribute_capacity_is_the_papers_layout():
    assert train.redistribute_capacity((1, 2, 2, 2)) == [2, 2, 2]      # CIFAR-10: 128 -> 256 at 32x32, no 4x4
    assert train.redistribute_capacity([1, 2, 2]) == [2, 2]
    assert train.redistribute_capacity((1, 1, 2, 2, 2)) == [1, 2, 2, 2]  # 64x64: the official README's --cres=1,2,2,2
    with pytest.raises(ValueError, match=r'channel_mult \(2,\)'): train.redistribute_capacity([2])


@pytest.mark.parametrize('kwargs, message', [
    (dict(config='G'), "unknown config 'G'"), (dict(config='a'), "unknown config 'a'"),
    (dict(config='A', base='edm'), "unknown base 'edm'"), (dict(config='B', total_nimg=0), 'total_nimg must be positive'),
    (dict(config='A', pixels=-3), 'pixels must be positive')])
def test_bad_ladder_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message): train.ladder_settings(**kwargs)


# ---- the two loop settings --------------------------------------------------------------------------------------

def test_grad_clip_bounds_the_step_of_plain_sgd():
    """With SGD at lr 1 the update is minus the (clipped) gradient: its norm is the clip when the gradient is longer,
    the gradient itself when it is shorter."""
    for g_norm, clip in ((10.0, 1.0), (0.5, 1.0)):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64) * (g_norm / 5)
        opt = torch.optim.SGD([p], lr=1.0)
        train.optimizer_step(torch.nn.ParameterList([p]), opt, lr=1.0, grad_clip=clip)
        assert math.isclose(float(p.detach().norm()), min(g_norm, clip), rel_tol=1e-6)  # clip / (norm + 1e-6)
        assert torch.allclose(p.detach() / p.detach().norm(), -torch.tensor([0.6, 0.8, 0, 0], dtype=torch.float64))


def test_xflip_mirrors_about_half_of_the_images():
    """Every image the loss sees is the original or its mirror; over 2,000 draws about half are mirrored
    (binomial, within 5 standard errors); without xflip none is."""
    image = torch.arange(12.0).reshape(1, 1, 3, 4)  # no symmetry: mirror != original
    data = ImageSet(image.repeat(2000, 1, 1, 1), torch.zeros(2000, dtype=torch.long), 'test')
    seen = []

    def loss_fn(net, images, labels=None, augment_pipe=None):
        seen.append(images.clone())
        return (net.w * images) ** 2

    net = torch.nn.Module()
    net.w = torch.nn.Parameter(torch.ones(()))
    for xflip in (True, False):
        seen.clear()
        config = train.TrainConfig(batch_size=2000, xflip=xflip)
        torch.manual_seed(0)
        train.accumulate_gradients(net, loss_fn, data, [torch.arange(2000)], torch.device('cpu'), config)
        images = torch.cat(seen)
        mirrored = (images == image.flip(-1)).flatten(1).all(1)
        assert bool(((images == image).flatten(1).all(1) | mirrored).all())
        if xflip: assert abs(float(mirrored.float().mean()) - 0.5) < 5 * math.sqrt(0.25 / 2000)
        else: assert not mirrored.any()


def test_old_checkpoints_resume_with_the_new_settings_off(tmp_path):
    """A checkpoint written before grad_clip/xflip existed resumes as a run with both off, and only so."""
    net = torch.nn.Linear(2, 2)
    ema, opt = torch.nn.Linear(2, 2), torch.optim.Adam(net.parameters())
    config = train.TrainConfig(batch_size=4)
    saved = {k: v for k, v in vars(config).items() if k not in ('grad_clip', 'xflip')}
    path = checkpoints.save_training_state(tmp_path, 1, net, ema, opt, dict(config=saved), keep=0)
    defaults = dict(grad_clip=None, xflip=False)
    expect = {k: getattr(config, k) for k in train.TRAJECTORY}
    assert checkpoints.restore_training_state(path, net, ema, opt, expect, defaults)[0] == 1
    with pytest.raises(checkpoints.CheckpointError, match='xflip=False, this run has xflip=True'):
        checkpoints.restore_training_state(path, net, ema, opt, dict(expect, xflip=True), defaults)


# ---- the command line --------------------------------------------------------------------------------------------

def _meta(run):
    return checkpoints.read_meta(checkpoints.find_latest(run))


def test_config_a_records_the_baseline_and_resumes_exactly(capsys, tmp_path, images):
    """Config A (VP): Song's settings scaled to a 24-image run, per-pixel loss (1/192 for 3x8x8), clipping and x-flips
    on; resumed from its step-2 checkpoint, it ends bit-identical to the run that never stopped."""
    flags = ('--config', 'A', '--batch', 4, '--checkpoint-every', 2, '--keep', 0)
    code, _, err = _run(capsys, *TRAIN, *flags, '--steps', 6, '--outdir', tmp_path / 'whole')
    assert code == 0, err
    meta = _meta(tmp_path / 'whole')
    c = meta['config']
    assert (c['lr'], c['grad_clip'], c['xflip'], c['ema_rampup_ratio'], c['batch_size']) == (2e-4, 1.0, True, None, 4)
    assert math.isclose(c['loss_scaling'], 1 / 192)
    scale = 24 / 200e6
    assert meta['ladder'] == dict(config='A', base='vp', scale=scale)
    assert c['lr_rampup_nimg'] == round(640_000 * scale) and c['ema_halflife_nimg'] == 1
    assert meta['model']['precond'] == 'vp' and meta['loss'] == 'vp'
    assert meta['model']['overrides']['dropout'] == 0.1 and meta['model']['overrides']['embedding_type'] == 'positional'
    # a run cut at step 2: branched off the whole run's step-2 checkpoint (so both have one config), continued to 6
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'whole' / 'training-state-00000002.json',
                        '--outdir', tmp_path / 'cut', '--steps', 6, '--quiet')
    assert code == 0, err
    paths = [tmp_path / r / 'training-state-00000006.json' for r in ('whole', 'cut')]
    (a, _), (b, _) = (checkpoints.load_checkpoint(p) for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(('net.', 'ema.')))


def test_config_c_to_f_and_the_ve_base(capsys, tmp_path, images):
    for config, base in (('C', 've'), ('D', 've'), ('F', 'vp')):
        code, _, err = _run(capsys, *TRAIN, '--config', config, '--base', base, '--batch', 4, '--steps', 1,
                            '--outdir', tmp_path / config)
        assert code == 0, err
        meta = _meta(tmp_path / config)
        o = meta['model']['overrides']
        assert o['channel_mult'] == [2, 2]  # ddpmpp-small's (1, 2, 2) redistributed
        assert o['embedding_type'] == ('fourier' if base == 've' else 'positional')
        assert meta['model'].get('precond', 'edm') == ('edm' if config in 'DF' else base)
        assert meta['loss'] == ('edm' if config == 'F' else base)
        assert meta['data']['augment'] == (0.12 if config == 'F' else 0) and o['augment_dim'] == (9 if config == 'F' else 0)
        assert meta['config']['xflip'] == (config != 'F') and meta['config']['grad_clip'] is None


def test_flags_given_override_the_config(capsys, tmp_path, images):
    code, _, err = _run(capsys, *TRAIN, '--config', 'F', '--batch', 4, '--steps', 1, '--dropout', 0, '--xflip',
                        '--augment', 0, '--lr', 2e-3, '--ema-rampup', 'none', '--grad-clip', 5,
                        '--channel-mult', '1,1', '--precond', 'vp', '--outdir', tmp_path / 'r')
    assert code == 0, err
    meta = _meta(tmp_path / 'r')
    c, o = meta['config'], meta['model']['overrides']
    assert (c['xflip'], c['lr'], c['ema_rampup_ratio'], c['grad_clip']) == (True, 2e-3, None, 5.0)
    assert (o['dropout'], o['channel_mult'], o['augment_dim'], meta['data']['augment']) == (0, [1, 1], 0, 0)
    assert meta['model']['precond'] == 'vp' and meta['loss'] == 'edm'


@pytest.mark.parametrize('extra, message', [
    (('--config', 'G'), "argument --config: invalid choice: 'G'"),
    (('--base', 've'), '--base ve applies only with --config'),
    (('--channel-mult', '1,x'), "argument --channel-mult: expected 1 to 8 multipliers in 1..64 like 1,2,2, got '1,x'"),
    (('--channel-mult', '0,2'), 'argument --channel-mult: expected'),
    (('--ema-rampup', '1.5'), "argument --ema-rampup: expected a ratio in (0, 1] or 'none', got '1.5'"),
    (('--grad-clip', '-1'), "argument --grad-clip: expected a positive number, got '-1'"),
    (('--channel-mult', '1,2,2,2,2'), 'img_resolution=8 must be divisible'),
    (('--preset', 'adm-imagenet64', '--config', 'B'), '--config B needs a SongUNet preset'),
    (('--grad-clip', 'x'), "argument --grad-clip: expected a positive number, got 'x'")])
def test_bad_ladder_flags_are_named(capsys, tmp_path, images, extra, message):
    code, _, err = _run(capsys, *TRAIN, '--batch', 4, '--steps', 1, *extra, '--outdir', tmp_path / 'r')
    assert code in (1, 2) and message in err, err
    assert 'Traceback' not in err


def test_the_config_is_fixed_on_resume(capsys, tmp_path, images):
    code, _, err = _run(capsys, *TRAIN, '--config', 'B', '--batch', 4, '--steps', 1, '--outdir', tmp_path / 'r')
    assert code == 0, err
    for extra in (('--config', 'C'), ('--base', 've'), ('--channel-mult', '1,2')):
        code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'r', '--steps', 2, *extra)
        assert code == 1 and 'cannot change when resuming' in err, err
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'r', '--steps', 2, '--grad-clip', 1)
    assert code == 1 and 'grad_clip=None, this run has grad_clip=1.0' in err, err
    code, _, err = _run(capsys, 'train', '--resume', tmp_path / 'r', '--steps', 2, '--quiet')
    assert code == 0, err
    assert _meta(tmp_path / 'r')['ladder']['config'] == 'B'


def test_the_cifar10_presets_start_from_songs_layout():
    """The CIFAR-10 presets hold EDM's layout (2,2,2): configs A and B must use Song et al.'s (1,2,2,2) and config C
    redistribute that one; an NCSN++ preset is the VE column unless --base says otherwise; --grad-clip none turns
    config A's clipping off."""
    from types import SimpleNamespace
    from edm_lit.cli import train as cli_train
    data = SimpleNamespace(images=torch.zeros(1, 3, 32, 32))
    for preset in ('ddpmpp-cifar10', 'ncsnpp-cifar10'):
        for config, mult in (('A', [1, 2, 2, 2]), ('B', [1, 2, 2, 2]), ('C', [2, 2, 2]), ('F', [2, 2, 2])):
            args = SimpleNamespace(preset=preset, config=config, base=None, steps=None, duration=None, batch=None,
                                   channel_mult=None, dropout=None, label_dropout=None, channels=None, precond=None)
            ladder = cli_train._ladder(args)
            model = cli_train._model_record(args, data, 10, ladder, ladder['augment'])
            assert model['overrides']['channel_mult'] == mult, (preset, config)
            fourier = preset.startswith('ncsnpp')
            assert model['overrides']['embedding_type'] == ('fourier' if fourier else 'positional')
            assert model.get('precond', 'edm') == ('edm' if config == 'F' else 've' if fourier else 'vp')


def test_grad_clip_none_overrides_config_a(capsys, tmp_path, images):
    code, _, err = _run(capsys, *TRAIN, '--config', 'A', '--batch', 4, '--steps', 1, '--grad-clip', 'none',
                        '--outdir', tmp_path / 'r')
    assert code == 0, err
    assert _meta(tmp_path / 'r')['config']['grad_clip'] is None
