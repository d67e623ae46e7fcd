"""edm_lit.stochastic (chapter 4): Algorithm 2, its churn rule, per-sample noise, and its output distribution.

Expected values are exact: Algorithm 1 itself (bit for bit), the closed-form churn, and for Gaussian data the output
moments from a hand-derived recursion and from the data; Monte Carlo tolerances are stated in standard errors.
"""
import math

import pytest
import torch

from edm_lit import samplers
from edm_lit.samplers import heun_sampler
from edm_lit.schedules import VP, make_schedule
from edm_lit.stochastic import StackedRandomGenerator, ablation_sampler, churn, churn_gamma, edm_sampler, general_churn
from edm_lit.toy import FiniteSetDenoiser, GaussianMixture

MIXTURE = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.5, -1.0]]),
                          torch.tensor([0.4, 0.3, 0.5]))
MU, SIGMA_DATA = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5
GAUSS = GaussianMixture(torch.tensor([1.0]), MU[None], torch.tensor([SIGMA_DATA]))
Z = 4.5  # Monte Carlo tolerance, in standard errors



@pytest.mark.parametrize('num_steps', [1, 2, 18, 33])
def test_no_churn_is_algorithm_1_bit_for_bit(num_steps):
    latents = torch.randn(32, 2, generator=torch.Generator().manual_seed(num_steps))
    reference = heun_sampler(MIXTURE, latents, num_steps=num_steps)
    assert torch.equal(edm_sampler(MIXTURE, latents, num_steps=num_steps), reference)
    assert torch.equal(edm_sampler(MIXTURE, latents, num_steps=num_steps, S_churn=80, S_min=100), reference)
    assert torch.equal(edm_sampler(MIXTURE, latents, num_steps=num_steps, S_churn=80, S_max=1e-3), reference)


def test_no_churn_is_algorithm_1_for_images():
    y = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    net = FiniteSetDenoiser(y)
    assert torch.equal(edm_sampler(net, latents), heun_sampler(net, latents))


def test_gamma_rule():
    """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], 0 outside (Alg. 2, line 3)."""
    assert churn_gamma(1.0, 20, S_churn=5) == 0.25
    assert churn_gamma(1.0, 20, S_churn=80) == math.sqrt(2) - 1
    assert churn_gamma(0.049, 20, S_churn=5, S_min=0.05, S_max=50) == 0
    assert churn_gamma(50.5, 20, S_churn=5, S_min=0.05, S_max=50) == 0
    assert churn_gamma(0.05, 20, S_churn=5, S_min=0.05, S_max=50) == 0.25  # the window is closed
    assert churn_gamma(1.0, 20) == 0


@pytest.mark.parametrize('S_noise', [0.0, 1.0, 1.007])
def test_churn_step_closed_form(S_noise):
    """With unit noise, x_hat - x = t sqrt((1 + gamma)^2 - 1) S_noise and t_hat = (1 + gamma) t (Alg. 2, lines 4-6)."""
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    x_hat, t_hat = churn(MIXTURE, x, torch.tensor(2.0, dtype=torch.float64), 0.25, S_noise, torch.ones_like)
    assert t_hat.item() == 2.5
    assert torch.allclose(x_hat - x, torch.full_like(x, 2.0 * 0.75 * S_noise), rtol=1e-14, atol=0)


def test_stacked_generator_draws_each_row_from_its_own_seed():
    rnd = StackedRandomGenerator('cpu', [3, 2 ** 32 + 7])
    got = rnd.randn([2, 4], dtype=torch.float64)
    for row, seed in zip(got, (3, 7)):  # seeds are taken modulo 2^32, as in the official code
        assert torch.equal(row, torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    labels = StackedRandomGenerator('cpu', [1, 2, 3]).randint(10, size=[3])
    assert labels.shape == (3,) and labels.dtype == torch.int64 and bool(((labels >= 0) & (labels < 10)).all())


def test_a_sample_does_not_depend_on_its_batch():
    kwargs = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

    def generate(seeds):
        rnd = StackedRandomGenerator('cpu', seeds)
        return edm_sampler(MIXTURE, rnd.randn([len(seeds), 2]), randn_like=rnd.randn_like, **kwargs)

    batch = generate(list(range(10)))
    assert torch.equal(generate([6])[0], batch[6])
    assert torch.equal(generate([9, 6, 0, 3]), batch[[9, 6, 0, 3]])
    assert not torch.equal(batch[0], batch[1])


def predicted_moments(num_steps, S_churn=0.0, latent_std=1.0):
    """Exact mean and variance of Alg. 2's output for N(MU, SIGMA_DATA^2 I) data.

    The ODE is dx/dt = lam(t) (x - MU), lam = t / (SIGMA_DATA^2 + t^2); a Heun step from t_hat to t' (h = t' - t_hat)
    multiplies x - MU by 1 + h/2 (lam(t_hat) + lam(t') (1 + h lam(t_hat))), the final Euler step by
    1 + h lam(t_hat); a churn adds t_hat^2 - t^2 to the variance. The steps are Eq. 5 (sigma_min = 0.002,
    sigma_max = 80, rho = 7) and gamma_i = min(S_churn / N, sqrt(2) - 1), written out here independently of the
    library.
    """
    lam = lambda t: t / (SIGMA_DATA ** 2 + t ** 2)
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    t_steps = [(a + i / max(num_steps - 1, 1) * (b - a)) ** 7 for i in range(num_steps)] + [0.0]
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
    offset, var = -MU, (latent_std * t_steps[0]) ** 2
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        t_hat = t_cur * (1 + gamma)
        var += t_hat ** 2 - t_cur ** 2
        h = t_next - t_hat
        factor = (1 + h * lam(t_hat) if i == num_steps - 1
                  else 1 + h / 2 * (lam(t_hat) + lam(t_next) * (1 + h * lam(t_hat))))
        offset, var = factor * offset, factor ** 2 * var
    return MU + offset, var


def sample_gaussian(num_steps, S_churn, n=20_000, seed=0, latent_std=1.0):
    gen = torch.Generator().manual_seed(seed)
    noise = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    latents = latent_std * noise(torch.empty(n, 2, dtype=torch.float64))
    return edm_sampler(GAUSS, latents, randn_like=noise, num_steps=num_steps, S_churn=S_churn)


def assert_moments(x, mean, var):
    """Sample mean, variances and covariance of x (n, 2) within Z standard errors of (mean, var I)."""
    n = len(x)
    assert ((x.mean(0) - mean).abs() < Z * math.sqrt(var / n)).all(), (x.mean(0), mean)
    assert ((x.var(0) - var).abs() < Z * var * math.sqrt(2 / (n - 1))).all(), (x.var(0), var)
    assert abs(torch.cov(x.T)[0, 1]) < Z * var / math.sqrt(n), torch.cov(x.T)[0, 1]


@pytest.mark.parametrize('S_churn', [0, 5, 40])
def test_output_moments_follow_the_exact_recursion(S_churn):
    """At the default 18 steps the output moments are those of the hand-derived recursion (not yet the data's)."""
    mean, var = predicted_moments(18, S_churn)
    assert_moments(sample_gaussian(18, S_churn), mean, var)


@pytest.mark.parametrize('S_churn', [0, 10, 40])
def test_output_moments_match_the_data(S_churn):
    """With 256 steps the discretization bias is far below the standard error: the output matches the data."""
    n, mean, var = 20_000, *predicted_moments(256, S_churn)
    assert (mean - MU).abs().max() < 0.6 * SIGMA_DATA / math.sqrt(n)  # exact bias < 0.6 SE (start bias included)
    assert abs(var - SIGMA_DATA ** 2) < 0.6 * SIGMA_DATA ** 2 * math.sqrt(2 / n)
    assert_moments(sample_gaussian(256, S_churn, n=n, seed=1), MU, SIGMA_DATA ** 2)


def test_churn_forgets_a_wrong_initial_spread():
    """Latents with std 0.7: without churn the output variance stays ~0.49 sigma_data^2; with churn it returns to ~1."""
    for S_churn, expected in ((0, 0.49), (8, 1.0)):
        mean, var = predicted_moments(64, S_churn, latent_std=0.7)
        assert abs(var / SIGMA_DATA ** 2 - expected) < 0.03
        assert_moments(sample_gaussian(64, S_churn, n=10_000, seed=2, latent_std=0.7), mean, var)


@pytest.mark.parametrize('kwargs, match', [
    (dict(S_churn=-1), 'S_churn'), (dict(S_noise=-0.5), 'S_noise'), (dict(S_churn=float('nan')), 'S_churn'),
    (dict(S_min=2.0, S_max=1.0), 'S_min=2.0'), (dict(num_steps=0), 'num_steps'),
    (dict(sigma_min=80.0, sigma_max=0.002), 'sigma_min=80.0')])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm_sampler(MIXTURE, torch.zeros(2, 2), **kwargs)


def test_stacked_generator_bad_input():
    with pytest.raises(ValueError, match='empty'): StackedRandomGenerator('cpu', [])
    with pytest.raises(ValueError, match='number of seeds, 2'): StackedRandomGenerator('cpu', [1, 2]).randn([3, 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_per_sample_noise_and_no_churn_identity():
    net = MIXTURE.cuda()
    rnd = StackedRandomGenerator('cuda', range(6))
    latents = rnd.randn([6, 2], device='cuda')
    x = edm_sampler(net, latents, randn_like=rnd.randn_like, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    assert x.device.type == 'cuda' and x.dtype == torch.float64 and bool(torch.isfinite(x).all())
    assert torch.equal(edm_sampler(net, latents), heun_sampler(net, latents))
    single = StackedRandomGenerator('cuda', [4])
    alone = edm_sampler(net, single.randn([1, 2], device='cuda'), randn_like=single.randn_like, S_churn=40, S_min=0.05,
                        S_max=50, S_noise=1.003)
    assert torch.allclose(alone[0], x[4], rtol=1e-12, atol=1e-12)


COLUMNS = [dict(discretization='vp', schedule='vp', scaling='vp'), dict(discretization='ve', schedule='ve'),
           dict(discretization='iddpm'), dict(discretization='edm'), dict(discretization='edm', schedule='vp'),
           dict(discretization='edm', scaling='vp')]


@pytest.mark.parametrize('column', COLUMNS)
@pytest.mark.parametrize('solver, alpha', [('euler', 1), ('heun', 1), ('heun', 0.5)])
def test_general_sampler_without_churn_is_the_deterministic_one_bit_for_bit(column, solver, alpha):
    latents = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    kw = dict(num_steps=9, solver=solver, alpha=alpha, **column)
    reference = samplers.ablation_sampler(MIXTURE, latents, **kw)
    assert torch.equal(ablation_sampler(MIXTURE, latents, **kw), reference)
    assert torch.equal(ablation_sampler(MIXTURE, latents, S_churn=30, S_min=1e4, **kw), reference)  # empty window


@pytest.mark.parametrize('churned', [dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003), dict(S_churn=5)])
def test_general_sampler_with_sigma_t_equal_t_is_algorithm_2(churned):
    seeds = list(range(6))
    rnd_a, rnd_b = StackedRandomGenerator('cpu', seeds), StackedRandomGenerator('cpu', seeds)
    latents = rnd_a.randn([6, 2], dtype=torch.float64)
    a = edm_sampler(MIXTURE, latents, randn_like=rnd_a.randn_like, **churned)
    b = ablation_sampler(MIXTURE, rnd_b.randn([6, 2], dtype=torch.float64), randn_like=rnd_b.randn_like, **churned)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, edm_sampler(MIXTURE, latents), atol=1e-3)  # the churn noise did act


def test_general_churn_in_closed_form():
    """Noise of all ones: x_hat = s(t_hat)/s(t) x + s(t_hat) sqrt(sigma_hat^2 - sigma^2) S_noise, sigma_hat = 1.25 sigma.

    Eq. eq-sto-churn-general with the VP schedule and scaling.
    """
    sched = make_schedule('vp', 'vp')
    t = VP.sigma_inv(torch.tensor(3.0, dtype=torch.float64))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_hat, t_hat = general_churn(MIXTURE, x, t, 0.25, sched, S_noise=1.007, randn_like=torch.ones_like)
    s = lambda sigma: 1 / math.sqrt(1 + sigma ** 2)  # the VP scaling as a function of sigma, Table 1
    assert math.isclose(float(sched.sigma(t_hat)), 3.75, rel_tol=1e-12)
    expected = s(3.75) / s(3.0) * x + s(3.75) * math.sqrt(3.75 ** 2 - 9.0) * 1.007
    assert torch.allclose(x_hat, expected, rtol=1e-12, atol=0)
    drawn = []
    x_same, t_same = general_churn(MIXTURE, x, t, 0, sched, randn_like=lambda x: drawn.append(1) or x)
    assert x_same is x and t_same is t and drawn == [1]  # gamma = 0: untouched, but the noise is still drawn


@pytest.mark.parametrize('column', [dict(discretization='vp', schedule='vp', scaling='vp'),
                                    dict(discretization='ve', schedule='ve')])
def test_general_sampler_with_churn_samples_the_data(column):
    gen = torch.Generator().manual_seed(5)
    noise = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x = ablation_sampler(GAUSS, torch.randn(20_000, 2, generator=gen), randn_like=noise, num_steps=256, S_churn=10,
                         **column)
    n, var = len(x), SIGMA_DATA ** 2
    assert ((x.mean(0) - MU).abs() < Z * math.sqrt(var / n)).all(), x.mean(0)
    assert ((x.var(0) - var).abs() < Z * var * math.sqrt(2 / (n - 1))).all(), x.var(0)


@pytest.mark.parametrize('kwargs, match', [(dict(S_churn=-1), 'S_churn'), (dict(S_noise=-0.1), 'S_noise'),
                                           (dict(S_min=2, S_max=1), 'S_min'), (dict(solver='rk4'), 'rk4'),
                                           (dict(alpha=0), 'alpha'), (dict(discretization='cosine'), 'cosine'),
                                           (dict(schedule='cos'), 'cos')])
def test_general_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ablation_sampler(MIXTURE, torch.zeros(2, 2), **kwargs)
