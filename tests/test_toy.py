"""edm_lit.toy against exact answers: closed forms, Tweedie's identity, autograd, Monte Carlo, the two limits (chapter 1)."""
import math

import pytest
import torch

from edm_lit.toy import FiniteSetDenoiser, GaussianMixture, ring_mixture, score_from_denoiser

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lopsided(seed=0, d=3):
    """A 3-component mixture with no symmetry (its third central moment is not zero)."""
    means = torch.randn(3, d, generator=_gen(seed), dtype=F64)
    return GaussianMixture([0.5, 0.3, 0.2], means, [0.2, 0.5, 1.0])


def _log_p_data(x, weights, means, stds):
    """log of sum_k w_k N(x; mu_k, s_k^2 I), written out independently of the library."""
    d = means.shape[1]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return torch.logsumexp(torch.log(weights) - sq / (2 * stds**2) - d / 2 * torch.log(2 * math.pi * stds**2), dim=1)


SIGMAS = [0.05, 0.7, 3.0, torch.tensor(0.4, dtype=F64), torch.linspace(0.1, 2.0, 6, dtype=F64),
          torch.linspace(0.1, 2.0, 6, dtype=F64)[:, None]]


@pytest.mark.parametrize('sigma', SIGMAS, ids=['float-small', 'float', 'float-large', '0d', 'per-sample', 'column'])
def test_single_gaussian_is_the_wiener_filter(sigma):
    mu, s = torch.tensor([0.3, -1.2, 2.0], dtype=F64), 0.7
    gauss = GaussianMixture([1.0], mu[None], [s])
    x = torch.randn(6, 3, generator=_gen(1), dtype=F64)
    sig2 = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1) ** 2
    torch.testing.assert_close(gauss(x, sigma), mu + s**2 / (s**2 + sig2) * (x - mu), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gauss.score(x, sigma), -(x - mu) / (s**2 + sig2), rtol=1e-12, atol=1e-13)
    var = (s**2 + sig2).squeeze(1)
    log_p = -((x - mu) ** 2).sum(1) / (2 * var) - 1.5 * torch.log(2 * math.pi * var)
    torch.testing.assert_close(gauss.log_prob(x, sigma), log_p, rtol=1e-13, atol=1e-13)


def test_score_from_denoiser_is_eq3_for_gaussian_data():
    mu, s, sigma = torch.tensor([1.0, -2.0], dtype=F64), 0.5, 0.3
    x = torch.randn(4, 2, generator=_gen(2), dtype=F64)
    D_x = mu + s**2 / (s**2 + sigma**2) * (x - mu)
    torch.testing.assert_close(score_from_denoiser(D_x, x, sigma), -(x - mu) / (s**2 + sigma**2))
    per_sample = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    img = torch.randn(4, 1, 2, 2, generator=_gen(3), dtype=F64)
    torch.testing.assert_close(score_from_denoiser(torch.zeros_like(img), img, per_sample),
                               -img / per_sample.reshape(-1, 1, 1, 1) ** 2)


def test_symmetric_two_gaussians_closed_form():
    """Means +-a (1-D), common std s: D = s^2/v x + sigma^2 a/v tanh(a x / v), v = s^2 + sigma^2."""
    a, s = 1.3, 0.4
    mix = GaussianMixture([0.5, 0.5], [[a], [-a]], [s, s])
    x = torch.linspace(-3, 3, 41, dtype=F64)[:, None]
    for sigma in (0.05, 0.5, 2.0):
        v = s**2 + sigma**2
        torch.testing.assert_close(mix(x, sigma), s**2 / v * x + sigma**2 * a / v * torch.tanh(a * x / v),
                                   rtol=1e-12, atol=1e-13)


def test_two_point_set_is_a_tanh_for_any_trailing_shape():
    a = 0.8
    u = torch.randn(1, 3, 4, 4, generator=_gen(4), dtype=F64)
    u = u / u.norm()
    den = FiniteSetDenoiser(torch.cat([a * u, -a * u]))
    x = torch.randn(7, 3, 4, 4, generator=_gen(5), dtype=F64)
    for sigma in (0.2, 1.0, 5.0):
        exact = a * u * torch.tanh(a * (x * u).sum((1, 2, 3)) / sigma**2).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(den(x, sigma), exact, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize('sigma', [0.1, 0.5, 2.0, 'per-sample'])
def test_score_matches_autograd_of_log_prob(sigma):
    mix = _lopsided(6)
    x = (1.5 * torch.randn(50, 3, generator=_gen(7), dtype=F64)).requires_grad_()
    if sigma == 'per-sample': sigma = 0.1 + torch.rand(50, generator=_gen(8), dtype=F64)
    grad, = torch.autograd.grad(_log_p_data(x, mix.weights, mix.means, (mix.stds**2 + torch.as_tensor(
        sigma, dtype=F64).reshape(-1, 1) ** 2).sqrt()).sum(), x)
    with torch.no_grad():
        assert (mix.score(x, sigma) - grad).abs().max() < 1e-10
        assert (score_from_denoiser(mix(x, sigma), x, sigma) - grad).abs().max() < 1e-10
    grad_lib, = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    assert (grad_lib - grad).abs().max() < 1e-10


def test_denoiser_matches_importance_sampling_estimate():
    """E[y | y + n = x] by self-normalized importance sampling, within 4.5 standard errors (delta method)."""
    mix = _lopsided(9, d=2)
    y = mix.sample(400_000, generator=_gen(10))
    x = mix.sample(5, generator=_gen(11)) + 0.3 * torch.randn(5, 2, generator=_gen(12), dtype=F64)
    for sigma in (0.3, 1.0):
        omega = torch.softmax(-torch.cdist(x, y) ** 2 / (2 * sigma**2), dim=1)
        D_mc = omega @ y
        se = torch.sqrt(torch.stack([(omega**2 * (y[:, j] - D_mc[:, j, None]) ** 2).sum(1) for j in range(2)], 1))
        assert ((D_mc - mix(x, sigma)).abs() / se).max() < 4.5


def test_sample_moments_and_exact_moments():
    mix = _lopsided(13, d=2)
    w, mu, s = mix.weights, mix.means, mix.stds
    m = (w[:, None] * mu).sum(0)
    C = sum(w[k] * (s[k] ** 2 * torch.eye(2, dtype=F64) + torch.outer(mu[k], mu[k])) for k in range(3)) - torch.outer(m, m)
    torch.testing.assert_close(mix.mean, m)
    torch.testing.assert_close(mix.cov, C)
    n = 400_000
    y = mix.sample(n, generator=_gen(14))
    assert y.shape == (n, 2) and y.dtype == F64
    se_mean = (torch.diagonal(C) / n).sqrt()
    assert ((y.mean(0) - m).abs() / se_mean).max() < 5
    products = (y - m)[:, :, None] * (y - m)[:, None, :]  # unbiased for C given the exact mean
    assert ((products.mean(0) - C).abs() / (products.std(0) / n**0.5)).max() < 5


def test_log_prob_integrates_to_one_including_sigma_zero():
    ring = ring_mixture(8, radius=1.0, std=0.15)
    g = torch.linspace(-5, 5, 301, dtype=F64)
    grid = torch.stack(torch.meshgrid(g, g, indexing='ij'), -1).reshape(-1, 2)
    for sigma in (0.0, 0.3, 1.0):
        mass = ring.log_prob(grid, sigma).exp().sum() * (g[1] - g[0]) ** 2
        assert abs(mass.item() - 1) < 1e-3


def test_small_sigma_limit_of_the_mixture_has_rate_sigma_squared():
    """(D(x; sigma) - x) / sigma^2 -> grad log p_data(x), with an O(sigma^2) error (order 2 convergence)."""
    mix = _lopsided(15, d=2)
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=F64).requires_grad_()
    grad, = torch.autograd.grad(_log_p_data(x, mix.weights, mix.means, mix.stds).sum(), x)
    errs = [((mix(x.detach(), s) - x.detach()) / s**2 - grad).abs().max().item() for s in (0.02, 0.01)]
    assert errs[1] < 1e-3
    assert 3.5 < errs[0] / errs[1] < 4.5  # halving sigma divides the error by 4
    assert (mix(x.detach(), 1e-6) - x).abs().max() < 1e-10


def _third_moment_limit(x, m, C, T):
    return (x - m) @ C - 0.5 * T  # C symmetric


@pytest.mark.parametrize('sigma', [1e2, 1e3])
def test_large_sigma_limit_of_the_mixture(sigma):
    """sigma^2 (D - m) -> C (x - m) - T / 2 with T = sum_k w_k (a_k |a_k|^2 + (d + 2) s_k^2 a_k), a_k = mu_k - m."""
    mix = _lopsided(16)
    w, mu, s, d = mix.weights, mix.means, mix.stds, 3
    m = (w[:, None] * mu).sum(0)
    a = mu - m
    T = (w[:, None] * (a * (a**2).sum(1, keepdim=True) + (d + 2) * s[:, None] ** 2 * a)).sum(0)
    C = (w[:, None, None] * (s[:, None, None] ** 2 * torch.eye(d, dtype=F64) + a[:, :, None] * a[:, None, :])).sum(0)
    x = torch.randn(5, d, generator=_gen(17), dtype=F64)
    assert T.abs().max() > 0.05
    err = (sigma**2 * (mix(x, sigma) - m) - _third_moment_limit(x, m, C, T)).abs().max()
    assert err < 50 / sigma**2


def test_large_sigma_limit_of_a_finite_set():
    y = torch.rand(20, 3, generator=_gen(18), dtype=F64) ** 2  # skewed: third moment not zero
    m = y.mean(0)
    C = (y - m).T @ (y - m) / len(y)
    T = ((y - m) * ((y - m) ** 2).sum(1, keepdim=True)).mean(0)
    x = torch.randn(4, 3, generator=_gen(19), dtype=F64)
    den = FiniteSetDenoiser(y)
    for sigma in (1e2, 1e3):
        err = (sigma**2 * (den(x, sigma) - m) - _third_moment_limit(x, m, C, T)).abs().max()
        assert err < 20 / sigma**2


def test_finite_set_snaps_to_the_nearest_point_exponentially():
    y = torch.randn(30, 2, generator=_gen(20), dtype=F64)
    x = torch.randn(10, 2, generator=_gen(21), dtype=F64)
    dist2 = torch.cdist(x, y) ** 2
    nearest = y[dist2.argmin(1)]
    den = FiniteSetDenoiser(y)
    for sigma in (0.05, 0.1, 0.2):
        delta = dist2 - dist2.min(1, keepdim=True).values
        bound = (torch.exp(-delta / (2 * sigma**2)) * torch.cdist(nearest, y)).sum(1)
        assert ((den(x, sigma) - nearest).norm(dim=1) <= bound * (1 + 1e-9) + 1e-14).all()
    torch.testing.assert_close(den(x, 1e-3), nearest, rtol=0, atol=1e-12)


def test_finite_set_is_the_zero_width_mixture():
    y = torch.randn(12, 2, generator=_gen(22), dtype=F64)
    mix = GaussianMixture(torch.full((12,), 1 / 12, dtype=F64), y, torch.full((12,), 1e-9, dtype=F64))
    x = torch.randn(9, 2, generator=_gen(23), dtype=F64)
    for sigma in (0.1, 1.0):
        torch.testing.assert_close(FiniteSetDenoiser(y)(x, sigma), mix(x, sigma), rtol=1e-10, atol=1e-12)


def test_finite_set_chunking_does_not_change_the_answer():
    y = torch.randn(50, 1, 3, 3, generator=_gen(24), dtype=F64)
    x = torch.randn(17, 1, 3, 3, generator=_gen(25), dtype=F64)
    sigma = torch.linspace(0.2, 2, 17, dtype=F64)
    full, chunked = FiniteSetDenoiser(y)(x, sigma), FiniteSetDenoiser(y, max_chunk=60)(x, sigma)
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-14)


def test_house_interface_and_dtypes():
    ring = ring_mixture()
    assert ring.sigma_min == 0 and ring.sigma_max == math.inf
    assert torch.equal(ring.round_sigma(0.5), torch.as_tensor(0.5))
    assert ring.weights.dtype == ring.means.dtype == ring.stds.dtype == F64
    torch.testing.assert_close(ring.mean, torch.zeros(2, dtype=F64), rtol=0, atol=1e-15)
    x = torch.randn(5, 2, generator=_gen(26))
    for out in (ring(x, 0.5), ring(x, 0.5, class_labels=None), ring.score(x, 0.5), ring.log_prob(x, 0.5)):
        assert out.dtype == torch.float32
    torch.testing.assert_close(ring(x, 0.5), ring.denoiser(x.double(), 0.5).float())
    img = FiniteSetDenoiser(torch.zeros(3, 1, 4, 4))
    assert img(torch.zeros(2, 1, 4, 4, dtype=torch.float32), 1.0).dtype == torch.float32
    assert ring.sample(7, generator=_gen(27)).shape == (7, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_follows_the_input():
    ring, x = ring_mixture(), torch.randn(5, 2, generator=_gen(28), dtype=F64)
    cpu = ring(x, 0.3)
    gpu = ring.cuda()(x.cuda(), torch.tensor(0.3, device='cuda'))
    assert gpu.device.type == 'cuda'
    torch.testing.assert_close(gpu.cpu(), cpu)
    y = torch.randn(10, 2, generator=_gen(29), dtype=F64)
    torch.testing.assert_close(FiniteSetDenoiser(y)(x.cuda().float(), 0.3).cpu(), FiniteSetDenoiser(y)(x, 0.3).float())
    assert ring.sample(4, generator=torch.Generator('cuda').manual_seed(0)).device.type == 'cuda'


@pytest.mark.parametrize('args, match', [
    (([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0]), 'sum to 1'),
    (([1.5, -0.5], [[0.0], [1.0]], [1.0, 1.0]), '>= 0'),
    (([0.5, 0.5], [[0.0], [1.0]], [1.0, 0.0]), r'stds must be > 0, got \[1.0, 0.0\]'),
    (([0.5, 0.5], [[0.0], [1.0]], [1.0, -2.0]), 'stds must be > 0'),
    (([0.5, 0.5], [[0.0], [1.0], [2.0]], [1.0, 1.0]), r'means must have shape \(K=2, d\)'),
    (([0.5, 0.5], [0.0, 1.0], [1.0, 1.0]), 'means must have shape'),
    (([0.5, 0.5], [[0.0], [1.0]], [1.0]), 'stds must have shape'),
    (([], [], []), 'K >= 1'),
])
def test_bad_mixture_parameters(args, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(*args)


@pytest.mark.parametrize('call, match', [
    (lambda r: r(torch.zeros(3, 2), 0.0), r'sigma must be finite and > 0, got \[0.0\]'),
    (lambda r: r(torch.zeros(3, 2), -1.0), r'> 0, got \[-1.0\]'),
    (lambda r: r.score(torch.zeros(3, 2), torch.tensor([0.1, 0.0, 0.2])), r'> 0, got \[0.0\]'),
    (lambda r: r.log_prob(torch.zeros(3, 2), -0.1), r'>= 0, got \[-0.1'),
    (lambda r: r(torch.zeros(3, 2), float('nan')), 'finite'),
    (lambda r: r(torch.zeros(3, 2), torch.ones(4)), r'sigma of shape \(4,\) does not fit a batch of 3'),
    (lambda r: r(torch.zeros(3, 3), 1.0), r'x must have shape \(N, 2\).*got \(3, 3\)'),
    (lambda r: r(torch.zeros(2), 1.0), r'x must have shape \(N, 2\)'),
    (lambda r: r.sample(0), 'positive integer, got 0'),
    (lambda r: FiniteSetDenoiser(torch.zeros(4, 1, 2, 2))(torch.zeros(3, 1, 2, 3), 1.0),
     r'x must have shape \(N, 1, 2, 2\).*got \(3, 1, 2, 3\)'),
    (lambda r: FiniteSetDenoiser(torch.zeros(4, 2))(torch.zeros(3, 2), 0.0), r'> 0, got \[0.0\]'),
    (lambda r: FiniteSetDenoiser(torch.zeros(4)), r'y must have shape \(M, \*shape\)'),
    (lambda r: score_from_denoiser(torch.zeros(3, 2), torch.zeros(3, 3), 1.0), 'D_x has shape'),
    (lambda r: score_from_denoiser(torch.zeros(3, 2), torch.zeros(3, 2), 0.0), r'> 0, got \[0.0\]'),
    (lambda r: ring_mixture(0), 'num_components must be a positive integer, got 0'),
])
def test_bad_inputs_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(ring_mixture())
