"""edm_lit.latent (chapter 15): the diagonal-Gaussian KL against exact values and Monte Carlo, the VAE's shapes, loss
and seeded determinism, the Gaussianity measure against exact moments, the latent EDM's own σ_data in the wrapper, the
loss and the sampler, bad inputs; and benchmarks/latent_study.py end to end at toy sizes (record, resumption, figure,
refusals)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_lit import latent
from edm_lit.data import load_fashion_mnist
from edm_lit.precond import edm_coefficients

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(latent_channels=4, channels=(4, 8))  # a VAE small enough for a unit test


@pytest.fixture(scope='module')
def images():
    return load_fashion_mnist(train=False, source='embedded').images[:64]


def test_gaussian_kl_exact_values():
    mean = torch.tensor([0.0, 1.0, 0.0, -2.0, 0.5], dtype=torch.float64)
    logvar = torch.tensor([0.0, 0.0, 1.0, math.log(0.01), -1.0], dtype=torch.float64)
    by_hand = torch.tensor([0.0, 0.5, (math.e - 2) / 2, (4 + 0.01 - 1 + math.log(100)) / 2,
                            (0.25 + math.exp(-1)) / 2], dtype=torch.float64)
    kl = latent.gaussian_kl(mean, logvar)
    assert kl[0] == 0 and torch.allclose(kl, by_hand, rtol=0, atol=1e-12)  # KL = 0 exactly at N(0, 1)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    assert (latent.gaussian_kl(torch.randn(1000, generator=g), 3 * torch.randn(1000, generator=g)) >= 0).all()


def test_gaussian_kl_matches_monte_carlo():
    """E_q[ln q(z) − ln p(z)] over draws of the reparameterization agrees within four standard errors; the draws have
    the posterior's mean and variance."""
    mean = torch.tensor([0.7, -1.5, 0.0], dtype=torch.float64)
    logvar = torch.tensor([-2.0, 1.5, -0.5], dtype=torch.float64)
    n = 200_000
    z = latent.reparameterize(mean.expand(n, -1), logvar.expand(n, -1), torch.Generator().manual_seed(3))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    ratio = q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)
    se = ratio.std(0) / math.sqrt(n)
    assert ((ratio.mean(0) - latent.gaussian_kl(mean, logvar)).abs() < 4 * se).all()
    assert torch.allclose(z.mean(0), mean, atol=0.02) and torch.allclose(z.var(0), logvar.exp(), rtol=0.02)


def test_vae_shapes_loss_and_batch_independence(images):
    torch.manual_seed(0)
    vae = latent.VAE(**TINY).eval()
    loss, rec, kl = latent.vae_loss(vae, images[:8], 0.3, torch.Generator().manual_seed(0))
    assert loss.shape == rec.shape == kl.shape == (8,) and torch.allclose(loss, rec + 0.3 * kl)
    z = latent.encode(vae, images)
    assert z.shape == (64, 4, 7, 7) and latent.decode(vae, z).shape == (64, 1, 28, 28)
    assert torch.allclose(latent.encode(vae, images[5:6]), z[5:6], atol=1e-6)  # no batch statistics
    draw = lambda seed: latent.encode(vae, images, sample=True, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    mean, logvar = latent.posterior(vae, images, batch_size=7)
    assert torch.allclose(mean, z, atol=1e-6) and logvar.min() >= -30 and logvar.max() <= 20


def test_train_vae_is_seeded_and_deterministic(images):
    state = torch.random.get_rng_state()
    train = lambda seed: latent.train_vae(images, 0.01, steps=4, batch_size=8, seed=seed, **TINY).state_dict()
    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is untouched


def test_larger_beta_gives_smaller_kl_and_larger_error(images):
    """Thirty steps already separate a weak and a strong KL weight: the rate falls, the reconstruction error rises."""
    weak, strong = (latent.measure_vae(latent.train_vae(images, b, steps=30, batch_size=16, lr=1e-2, **TINY), images)
                    for b in (1e-4, 10.0))
    assert strong['kl'] < 0.1 * weak['kl'] and strong['reconstruction_mse'] > 1.2 * weak['reconstruction_mse']


def test_gaussianity_is_zero_on_gaussians_and_exact_on_known_shapes():
    n, g = 40_000, torch.Generator().manual_seed(5)
    floor = latent.gaussian_floor(n)
    assert floor['skewness'] == pytest.approx(math.sqrt(6 / n), rel=1e-3)
    assert floor['excess_kurtosis'] == pytest.approx(math.sqrt(24 / n), rel=1e-3)
    got = latent.gaussianity(torch.randn(n, 4, 7, 7, generator=g, dtype=torch.float64))  # 196 coordinates
    assert got['skewness'] == pytest.approx(floor['skewness'], rel=0.15)
    assert got['excess_kurtosis'] == pytest.approx(floor['excess_kurtosis'], rel=0.15)
    uniform = latent.gaussianity(torch.rand(n, 32, generator=g, dtype=torch.float64))
    assert uniform['skewness'] < 0.03 and uniform['excess_kurtosis'] == pytest.approx(1.2, abs=0.02)
    exponential = latent.gaussianity(-torch.rand(n, 32, generator=g, dtype=torch.float64).log())
    assert exponential['skewness'] == pytest.approx(2, abs=0.1) and exponential['excess_kurtosis'] > 4


def test_sigma_data_is_the_rms():
    z = 0.3 + 0.7 * torch.randn(100_000, 8, generator=torch.Generator().manual_seed(2))
    assert latent.latent_sigma_data(z) == pytest.approx(math.sqrt(0.3 ** 2 + 0.7 ** 2), rel=0.005)
    assert latent.latent_sigma_data(torch.full((3, 4), -2.0)) == 2.0


def test_measure_vae_reports_every_quantity(images):
    vae = latent.train_vae(images, 0.1, steps=2, batch_size=8, **TINY)
    m = latent.measure_vae(vae, images)
    assert set(m) == {'reconstruction_mse', 'kl', 'sigma_data', 'skewness', 'excess_kurtosis', 'n'}
    assert m['n'] == 64 and all(math.isfinite(v) and v >= 0 for v in m.values())
    assert m == latent.measure_vae(vae, images)  # seeded


def test_latent_edm_uses_the_latents_sigma_data():
    """c_skip(σ_data) = 1/2 and c_out(σ_data) = σ_data/√2 for any σ_data; λ and p_train in units of σ_data."""
    for sigma_data in (0.2, 3.7):
        net, loss = latent.latent_denoiser(sigma_data, model_channels=16), latent.latent_loss(sigma_data)
        c_skip, c_out, c_in, _ = net.coefficients(torch.tensor(sigma_data, dtype=torch.float64))
        assert net.sigma_data == loss.sigma_data == sigma_data
        assert c_skip.item() == pytest.approx(0.5, abs=1e-12) and c_out.item() == pytest.approx(sigma_data / 2 ** 0.5)
        assert c_in.item() == pytest.approx(1 / (sigma_data * 2 ** 0.5))
        assert loss.P_mean == pytest.approx(-1.2 + math.log(sigma_data / 0.5)) and loss.P_std == 1.2
        assert net(torch.randn(2, 4, 7, 7), torch.tensor([0.5, 5.0])).shape == (2, 4, 7, 7)
    sigma = torch.logspace(-2, 2, 5, dtype=torch.float64)
    a, b = edm_coefficients(sigma, 0.5), edm_coefficients(8 * sigma, 4.0)
    assert torch.allclose(a[0], b[0]) and torch.allclose(8 * a[1], b[1]) and torch.allclose(a[2], 8 * b[2])


def test_sample_latent_images_is_per_seed(images):
    vae = latent.train_vae(images, 0.1, steps=2, batch_size=8, **TINY)
    torch.manual_seed(0)
    net = latent.latent_denoiser(1.3, model_channels=16)
    a = latent.sample_latent_images(net, vae, [4, 5, 6], num_steps=3, batch_size=2)
    b = latent.sample_latent_images(net, vae, [4, 5, 6], num_steps=3, batch_size=3)
    assert a.shape == (3, 1, 28, 28) and a.abs().max() <= 1 and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('call, message', [
    (lambda x: latent.train_vae(x, 0.0, steps=1), 'beta must be > 0, got 0.0'),
    (lambda x: latent.train_vae(x, -1e-3, steps=1), 'beta must be > 0, got -0.001'),
    (lambda x: latent.train_vae(x, 1e-3, steps=0), 'steps must be an integer'),
    (lambda x: latent.train_vae(x, 1e-3, steps=1, batch_size=65), 'batch_size must be an integer in [1, 64]'),
    (lambda x: latent.train_vae(x, 1e-3, steps=1, lr=0), 'lr must be > 0'),
    (lambda x: latent.train_vae(torch.nn.functional.pad(x, (2, 2, 2, 2)), 1e-3), 'H, W = (28, 28)'),
    (lambda x: latent.train_vae(2 * x, 1e-3), 'must lie in [-1, 1]'),
    (lambda x: latent.decode(latent.VAE(**TINY), torch.zeros(2, 4, 8, 8)), 'latents must have shape (N, 4, 7, 7)'),
    (lambda x: latent.gaussianity(torch.randn(3, 5)), 'need at least 4 latents to measure a shape, got 3'),
    (lambda x: latent.gaussianity(torch.ones(10, 5)), 'constant'),
    (lambda x: latent.gaussian_floor(3), 'n must be an integer in [4'),
    (lambda x: latent.latent_denoiser(0.0), 'sigma_data must be > 0, got 0.0'),
    (lambda x: latent.latent_loss(-2), 'sigma_data must be > 0, got -2'),
    (lambda x: latent.latent_denoiser(1.0, channel_mult=(1, 2)), 'img_resolution=7 must be divisible'),
], ids=range(14))
def test_bad_inputs_raise_naming_the_value(images, call, message):
    with pytest.raises(ValueError) as e:
        call(images)
    assert message in str(e.value), str(e.value)


def _study(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'latent_study.py'), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_latent_study_end_to_end(tmp_path):
    """The whole study at toy sizes: three VAEs, three latent models and the pixel model scored against a finite
    floor; a run stopped after five stages continues with the other two and keeps the five; the figures; the
    refusals of bad arguments and of a record made with other settings, as messages, not tracebacks."""
    out = tmp_path / 'study.json'
    tiny = ('--vae-steps', 20, '--vae-batch', 16, '--vae-channels', 4, 8, '--latent-model-channels', 16,
            '--pixel-channels', 8, '--minutes', 0.02, '--batch', 16, '--n', 16, '--steps', 4, '--sample-batch', 16,
            '--source', 'embedded', '--train-images', 512, '--workdir', tmp_path / 'work', '--out', out)
    proc = _study(*tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['settings']['betas'] == [1e-6, 1e-3, 1.0] and r['settings']['n'] == 16 and r['data_source'] == 'embedded'
    assert math.isfinite(r['floor_fid']) and r['floor_fid'] > 0 and 'latent_study.py' in r['command']
    names = [x['name'] for x in r['results']]
    assert names == ['vae-beta1e-06', 'vae-beta0.001', 'vae-beta1', 'latent-beta1e-06', 'latent-beta0.001',
                     'latent-beta1', 'pixel'], names
    for x in r['results']:
        if x['stage'] == 'vae':
            assert {'reconstruction_mse', 'kl', 'sigma_data', 'skewness', 'excess_kurtosis', 'recon_fid'} <= set(x)
            assert math.isfinite(x['recon_fid']) and x['kl'] >= 0 and x['reconstruction_mse'] > 0
        else:
            assert x['steps'] >= 1 and x['nimg'] == 16 * x['steps'] and x['train_images_per_s'] > 0
            assert math.isfinite(x['fid']) and x['fid'] > 0 and x['sample_seconds'] >= 0 and x['sigma_data'] > 0
    assert r['results'][-1]['sigma_data'] == 0.5  # pixels: the paper's σ_data
    assert (tmp_path / 'work' / 'vae-beta0.001.safetensors').is_file()
    cut = dict(r, results=r['results'][:5])  # as if stopped after five stages: the rest are run, the five kept
    out.write_text(json.dumps(cut))
    again = _study(*tiny)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert [x['name'] for x in resumed['results']] == names and resumed['results'][:5] == r['results'][:5]
    assert 'vae-beta' not in again.stdout and 'latent-beta1 ' in again.stdout
    proc = _study('--out', out, '--plot', tmp_path / 'study.png')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'study.png').stat().st_size > 10_000 and (tmp_path / 'study_samples.png').stat().st_size > 10_000
    for args, message in (((*tiny[:-2], '--out', out, '--n', 8), 'holds a study with other settings'),
                          (('--betas', 1e-3, -1, '--out', tmp_path / 'x.json'), '--betas must be finite numbers > 0'),
                          (('--minutes', 0, '--out', tmp_path / 'x.json'), '--minutes 0'),
                          (('--out', tmp_path / 'none.json', '--plot', tmp_path / 'x.png'), 'not found')):
        proc = _study(*args)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
