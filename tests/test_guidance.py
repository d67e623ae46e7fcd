"""edm_lit.guidance (chapter 13): the guided denoiser's formula against hand-made denoisers, the labelled mixture's
exact conditionals (Bayes, closed forms), and bad inputs."""
import math

import pytest
import torch

from edm_lit.guidance import Guided, LabelledMixture, assign, coverage, sample_guided
from edm_lit.toy import GaussianMixture


class Affine(torch.nn.Module):
    """D(x; sigma, c) = a x + b + (label index + 1) if labelled, a x + b with no label (zeros) or None."""
    def __init__(self, a, b, sigma_min=0.0, sigma_max=math.inf):
        super().__init__()
        self.a, self.b, self.sigma_min, self.sigma_max, self.calls = a, b, sigma_min, sigma_max, 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        shift = 0 if class_labels is None else (class_labels * torch.arange(1, class_labels.shape[1] + 1)).sum(1)
        return self.a * x + self.b + (shift[:, None] if torch.is_tensor(shift) else shift)


def test_cfg_and_autoguidance_formulas():
    x, labels = torch.randn(5, 3), torch.eye(4)[[0, 1, 2, 3, 1]]
    net, guide = Affine(2.0, 1.0), Affine(0.5, -1.0)
    for w in (0.0, 1.0, 2.5, 7.0):
        D_1, D_u = net(x, 1.0, labels), net(x, 1.0, torch.zeros_like(labels))
        assert torch.allclose(Guided(net, w)(x, 1.0, labels), D_u + w * (D_1 - D_u))          # CFG
        assert torch.allclose(Guided(net, w, guide)(x, 1.0, labels), guide(x, 1.0, labels) + w * (D_1 - guide(
            x, 1.0, labels)))                                                                   # autoguidance
    net.calls = 0
    Guided(net, 1.0)(x, 1.0, labels)
    assert net.calls == 1  # w = 1 is the conditional model alone: one evaluation
    Guided(net, 3.0)(x, 1.0, labels)
    assert net.calls == 3  # otherwise two
    g = Guided(Affine(1, 0, sigma_min=0.01, sigma_max=50), 2, guide=Affine(1, 0, sigma_min=0.02, sigma_max=80))
    assert (g.sigma_min, g.sigma_max) == (0.02, 50)  # where both are defined


@pytest.mark.parametrize('bad', [-0.5, math.inf, math.nan, float('-inf')])
def test_guidance_weight_refused_by_value(bad):
    with pytest.raises(ValueError, match=f'guidance must be a finite number >= 0, got {bad}'):
        Guided(Affine(1, 0), bad)


def test_cfg_needs_labels():
    with pytest.raises(ValueError, match='classifier-free guidance needs class labels'):
        Guided(Affine(1, 0), 2.0)(torch.randn(2, 2), 1.0)


def test_labelled_mixture_conditionals_are_exact():
    mix = LabelledMixture([0.2, 0.3, 0.5], [[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], [0.5, 0.4, 0.3], [0, 0, 1])
    assert torch.allclose(mix.class_probs, torch.tensor([0.5, 0.5], dtype=torch.float64))
    c0 = mix.conditional(0)
    assert torch.allclose(c0.weights, torch.tensor([0.4, 0.6], dtype=torch.float64))
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1  # per row
    labels = torch.eye(2, dtype=torch.float64)[torch.arange(64) % 2]
    labels[::4] = 0  # every fourth row: no label
    D = mix(x, sigma, labels)
    for i in range(64):
        model = mix.data if i % 4 == 0 else mix.conditional(i % 2)
        assert torch.allclose(D[i], model.denoiser(x[i:i + 1], sigma[i:i + 1])[0], atol=1e-12)
    one = LabelledMixture([1.0], [[1.5, -0.5]], [0.7], [0])  # one Gaussian: D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)
    expect = (0.49 * x + 4.0 * torch.tensor([1.5, -0.5], dtype=torch.float64)) / (0.49 + 4.0)
    assert torch.allclose(one(x, 2.0, one.one_hot(0, 64)), expect, atol=1e-12)


def test_labelled_mixture_bad_inputs():
    for labels, message in (([0, 2], 'every class 0..2 needs a component'), ([0, -1], 'labels must be K=2 integers'),
                            ([0.0, 1.0], 'labels must be K=2 integers'), ([0], 'labels must be K=2 integers')):
        with pytest.raises(ValueError, match=message):
            LabelledMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0], labels)
    mix = LabelledMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match='class 2 is not in 0..1'): mix.conditional(2)
    with pytest.raises(ValueError, match=r'class_labels must have shape \(3, 2\), got \(3, 3\)'):
        mix(torch.zeros(3, 1), 1.0, torch.eye(3))


def test_guided_sampling_and_coverage():
    """w = 1 with an exact denoiser samples the class: fractions near the weights; guided samples are finite."""
    mix = LabelledMixture([0.25, 0.25, 0.5], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.3, 0.3, 0.3], [0, 0, 1])
    x = sample_guided(mix, 2000, mix.one_hot(0, 2000), 1.0)
    cov = coverage(mix.conditional(0), x)
    assert torch.allclose(cov['fraction'], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.05)
    assert (cov['shift'] < 0.05).all() and ((cov['spread'] - 0.3).abs() < 0.04).all()
    assert (assign(mix.data, x) != 2).float().mean() > 0.99  # almost nothing from class 1's component
    y = sample_guided(mix, 200, mix.one_hot(0, 200), 4.0, guide=LabelledMixture(
        [0.25, 0.25, 0.5], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.5, 0.5, 0.5], [0, 0, 1]))
    assert torch.isfinite(y).all() and coverage(mix.conditional(0), y)['spread'].max() < 0.3


def _checkpoint(folder, label_dim=10, label_dropout=0.1, channels=16, seed=0):
    """A tiny random DDPM++ for 1 x 32 x 32 images (EMA weights only); every weight perturbed, so that the output
    (zero at initialisation: the last layer starts at 0) depends on the image and the label."""
    from edm_lit import checkpoints, cli
    model = dict(preset='ddpmpp-small', overrides=dict(img_resolution=32, in_channels=1, out_channels=1,
                                                      label_dim=label_dim, augment_dim=0, model_channels=channels,
                                                      channel_mult=[1], num_blocks=1, attn_resolutions=[],
                                                      label_dropout=label_dropout))
    torch.manual_seed(seed)
    net = cli.build_net(model)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.05 * torch.randn_like(p))
    checkpoints.save_checkpoint(folder, 5, checkpoints.module_tensors('ema', net), dict(model=model, nimg=50))


def test_cli_guidance_and_autoguidance(capsys, tmp_path):
    import json
    import numpy as np
    from PIL import Image
    from test_cli import _run
    _checkpoint(tmp_path / 'm')
    _checkpoint(tmp_path / 'weak', seed=1)
    _checkpoint(tmp_path / 'uncond', label_dim=0, label_dropout=0)
    _checkpoint(tmp_path / 'nodrop', label_dropout=0)
    _checkpoint(tmp_path / 'wide', channels=32)  # another width is still the same task: a valid guide
    _checkpoint(tmp_path / 'other', label_dim=5)
    base = ['--seeds', '0-3', '--steps', 2, '--class', 3]
    png = lambda d: np.asarray(Image.open(tmp_path / d / 'grid.png')).astype(int)
    for name, extra in (('plain', []), ('w1', ['--guidance', 1]), ('cfg', ['--guidance', 3]),
                        ('auto', ['--guidance', 2, '--guide', tmp_path / 'weak']),
                        ('auto-wide', ['--guidance', 2, '--guide', tmp_path / 'wide'])):
        code, _, err = _run(capsys, 'sample', tmp_path / 'm', *base, *extra, '--outdir', tmp_path / name)
        assert code == 0, (name, err)
    assert np.array_equal(png('plain'), png('w1'))  # w = 1: no guidance
    from argparse import Namespace
    from edm_lit.cli.sample import guided_net, load_net
    net, meta = load_net(tmp_path / 'm', 'ema', 'cpu')
    x, labels = torch.randn(2, 1, 32, 32), torch.eye(10)[[3, 7]]
    with torch.no_grad():
        D_c, D_u = net(x, 1.0, labels), net(x, 1.0, torch.zeros_like(labels))
        weak, _ = load_net(tmp_path / 'weak', 'ema', 'cpu')
        D_0 = weak(x, 1.0, labels)
        cfg = guided_net(net, meta, Namespace(guidance=3.0, guide=None, checkpoint='m'), 'cpu')
        auto = guided_net(net, meta, Namespace(guidance=2.0, guide=tmp_path / 'weak', checkpoint='m'), 'cpu')
        assert (D_c - D_u).abs().max() > 1e-3  # the label matters, so guidance does
        assert torch.allclose(cfg(x, 1.0, labels), D_u + 3 * (D_c - D_u), atol=1e-5)
        assert torch.allclose(auto(x, 1.0, labels), D_0 + 2 * (D_c - D_0), atol=1e-5)
    for argv, message in [
        (['sample', tmp_path / 'uncond', '--guidance', 2], 'classifier-free guidance needs a class-conditional '
                                                            'model'),
        (['sample', tmp_path / 'nodrop', '--guidance', 2], 'trained without label dropout'),
        (['sample', tmp_path / 'm', '--guide', tmp_path / 'weak'], f'--guide {tmp_path / "weak"} needs --guidance'),
        (['sample', tmp_path / 'm', '--guidance', 2, '--guide', tmp_path / 'other'], 'a guide must model the same '
                                                                                     'task'),
        (['sample', tmp_path / 'm', '--guidance', 2, '--guide', tmp_path / 'none'], 'not found'),
    ]:
        code, _, err = _run(capsys, *argv, '--steps', 2, '--seeds', '0-1', '--outdir', tmp_path / 'bad')
        assert code == 1 and message in err and 'Traceback' not in err, (argv, err)
        assert not (tmp_path / 'bad').exists()
    code, _, err = _run(capsys, 'sample', tmp_path / 'm', '--guidance', -1, '--outdir', tmp_path / 'bad')
    assert code == 2 and '--guidance' in err
    code, out, err = _run(capsys, 'eval', tmp_path / 'm', '--seeds', '0-5', '--steps', 2, '--guidance', 2,
                          '--reference', 'fashion-test', '--source', 'embedded', '--json')
    r = json.loads(out)
    assert code == 0 and r['guidance'] == 2 and r['guide'] is None and r['network_evaluations'] == 2 * r['nfe'], err
