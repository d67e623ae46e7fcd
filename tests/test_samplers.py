"""edm_lit.samplers (chapter 3): Euler / Heun steps, Algorithm 1, the ablation sampler, NFE and convergence orders.

Every expected value is an exact answer — a Taylor polynomial, a quadrature error, a straight-line or Gaussian
closed-form flow, an order of convergence — never the code's own output.
"""
import math

import pytest
import torch

from edm_lit.samplers import (CountingDenoiser, ablation_sampler, edm_t_steps, error_vs_nfe, euler_step, heun_sampler,
                              heun_step, observed_order, rms_error)
from edm_lit.toy import FiniteSetDenoiser, GaussianMixture

MU, SIGMA_DATA, SIGMA_MIN, SIGMA_MAX = 0.3, 0.5, 0.002, 80.0
GAUSS = GaussianMixture(torch.tensor([1.0]), torch.tensor([[MU]]), torch.tensor([SIGMA_DATA]))
EPS = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]



def gaussian_exact(eps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """Exact N -> inf output for sigma(t) = t: the Gaussian flow to sigma_min, then one Euler step onto D.

    eq-det-gauss-exact of chapter 3.
    """
    var_min, var_max = SIGMA_DATA**2 + sigma_min**2, SIGMA_DATA**2 + sigma_max**2
    return MU + (sigma_max * eps - MU) * math.sqrt(var_min / var_max) * SIGMA_DATA**2 / var_min


@pytest.mark.parametrize('alpha', [0.25, 0.5, 2 / 3, 1.0])
def test_steps_reproduce_the_taylor_polynomial_of_a_linear_ode(alpha):
    """dx/dt = lam x: Euler gives 1 + h lam, every 2nd-order alpha rule gives 1 + h lam + (h lam)^2 / 2 exactly."""
    lam, x = -0.7, torch.tensor([1.0, -2.0], dtype=torch.float64)
    derivative = lambda x, t: lam * x
    t_cur, t_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    z = float(t_next - t_cur) * lam
    assert torch.allclose(euler_step(derivative, x, t_cur, t_next), x * (1 + z), rtol=1e-15, atol=0)
    assert torch.allclose(heun_step(derivative, x, t_cur, t_next, alpha), x * (1 + z + z * z / 2), rtol=1e-14, atol=0)


def test_quadrature_errors_of_heun_and_midpoint():
    """dx/dt = t^2 over [t0, t0 + h]: trapezoid (alpha = 1) is off by +h^3/6, midpoint (alpha = 1/2) by -h^3/12."""
    derivative = lambda x, t: t ** 2 * torch.ones_like(x)
    x = torch.zeros(1, dtype=torch.float64)
    t0, h = 1.0, -0.3
    exact = ((t0 + h) ** 3 - t0 ** 3) / 3
    t_cur, t_next = torch.tensor(t0, dtype=torch.float64), torch.tensor(t0 + h, dtype=torch.float64)
    assert heun_step(derivative, x, t_cur, t_next, alpha=1).item() - exact == pytest.approx(h ** 3 / 6, rel=1e-10)
    assert heun_step(derivative, x, t_cur, t_next, alpha=0.5).item() - exact == pytest.approx(-h ** 3 / 12, rel=1e-10)
    linear = lambda x, t: (2 - 3 * t) * torch.ones_like(x)  # exact for every alpha
    for alpha in (0.3, 0.5, 1.0):
        got = heun_step(linear, x, t_cur, t_next, alpha).item()
        assert got == pytest.approx(2 * h - 1.5 * ((t0 + h) ** 2 - t0 ** 2), rel=1e-13)


@pytest.mark.parametrize('num_steps', [1, 3, 18])
@pytest.mark.parametrize('solver', ['euler', 'heun'])
def test_one_point_data_is_followed_exactly_in_any_shape(num_steps, solver):
    """D = y constant: the EDM trajectories are straight lines (eq-det-straight); NFE = N or 2N - 1 (eq-det-nfe)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    latents = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float32)
    net = CountingDenoiser(FiniteSetDenoiser(y))
    x = ablation_sampler(net, latents, num_steps=num_steps, solver=solver)
    assert x.dtype == torch.float64 and x.shape == latents.shape
    assert torch.allclose(x, y.expand_as(x), rtol=0, atol=1e-12)
    assert net.nfe == (num_steps if solver == 'euler' else 2 * num_steps - 1)


@pytest.mark.parametrize('solver, steps, lo, hi', [('euler', (64, 128, 256), 0.8, 1.2),
                                                   ('heun', (16, 32, 64), 1.7, 2.3)])
@pytest.mark.parametrize('discretization', ['edm', 'vp', 've'])
def test_observed_order_against_the_gaussian_closed_form(solver, steps, lo, hi, discretization):
    """Terminal error against the exact Gaussian answer falls like NFE^-1 (Euler) and NFE^-2 (Heun)."""
    rows = error_vs_nfe(ablation_sampler, GAUSS, EPS, gaussian_exact(EPS), steps, solver=solver,
                        discretization=discretization, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    assert rows['num_steps'] == list(steps)
    assert rows['nfe'] == [n if solver == 'euler' else 2 * n - 1 for n in steps]
    assert lo < observed_order(rows['nfe'], rows['error']) < hi


@pytest.mark.parametrize('alpha, lo, hi', [(2 / 3, 1.7, 2.3), (0.5, 1.7, 3.3)])
def test_other_alpha_rules_are_second_order_too(alpha, lo, hi):
    """Ralston (alpha = 2/3) is 2nd order; the midpoint rule is at least 2nd order (on this linear ODE its h^3
    error terms happen to cancel along the rho-grid, so it shows order 3)."""
    rows = error_vs_nfe(ablation_sampler, GAUSS, EPS, gaussian_exact(EPS), (32, 64, 128), alpha=alpha,
                        sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    assert lo < observed_order(rows['nfe'], rows['error']) < hi


@pytest.mark.parametrize('schedule', ['linear', 've', 'vp'])
@pytest.mark.parametrize('scaling', ['none', 'vp'])
def test_every_schedule_reaches_the_same_point(schedule, scaling):
    """sigma(t), s(t) reparametrize one flow: all six reach the Gaussian answer (up to the last Euler step)."""
    x = ablation_sampler(GAUSS, EPS, num_steps=512, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                         schedule=schedule, scaling=scaling)
    assert (x - gaussian_exact(EPS)).abs().max() < 1e-3


def test_algorithm_1_equals_the_ablation_sampler_at_its_defaults():
    """(x - D)/t is Eq. 4 with sigma(t) = t, s(t) = 1: the two formulations agree to rounding."""
    latents = torch.randn(16, 1, generator=torch.Generator().manual_seed(3))
    a, b = heun_sampler(GAUSS, latents), ablation_sampler(GAUSS, latents)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(heun_sampler(GAUSS, EPS, num_steps=1), GAUSS(EPS * SIGMA_MAX, SIGMA_MAX), rtol=1e-14)


class RoundingNet:
    """A one-point denoiser with a restricted sigma range and a sigma grid of 0.001, recording its sigmas."""
    sigma_min, sigma_max = 0.01, 10.0

    def __init__(self): self.sigmas = []
    def round_sigma(self, sigma): return torch.round(torch.as_tensor(sigma, dtype=torch.float64) * 1000) / 1000
    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return torch.zeros_like(x)


@pytest.mark.parametrize('sampler', [heun_sampler, ablation_sampler])
def test_net_range_and_rounding_are_honoured(sampler):
    net = RoundingNet()
    sampler(net, torch.ones(2, 3), num_steps=12, sigma_min=0.002, sigma_max=80)
    assert max(net.sigmas) == 10.0 and min(net.sigmas) >= 0.01
    assert all(abs(s * 1000 - round(s * 1000)) < 1e-9 for s in net.sigmas)
    assert edm_t_steps(net, 5)[-1] == 0 and len(edm_t_steps(net, 5)) == 6


def test_counting_denoiser_forwards_the_interface():
    net = CountingDenoiser(RoundingNet())
    assert (net.sigma_min, net.sigma_max) == (0.01, 10.0) and net.round_sigma(0.12345).item() == 0.123
    plain = CountingDenoiser(lambda x, sigma, class_labels=None: x)
    assert (plain.sigma_min, plain.sigma_max) == (0, math.inf) and plain.nfe == 0


def test_observed_order_and_rms_error_are_exact():
    nfe = [10, 20, 40, 80]
    assert observed_order(nfe, [3.0 * n ** -1.5 for n in nfe]) == pytest.approx(1.5, rel=1e-12)
    assert rms_error(torch.full((3, 4), 2.0), torch.zeros(3, 4)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match='positive errors'): observed_order([1, 2], [0.1, 0.0])
    with pytest.raises(ValueError, match='>= 2 pairs'): observed_order([1], [0.1])
    with pytest.raises(ValueError, match=r'shape \(3, 4\)'): rms_error(torch.zeros(3, 4), torch.zeros(4, 3))


@pytest.mark.parametrize('kwargs, match', [
    (dict(solver='rk4'), "solver 'rk4'"), (dict(discretization='ddim'), "discretization 'ddim'"),
    (dict(schedule='cosine'), "schedule 'cosine'"), (dict(scaling='sub'), "scaling 'sub'"),
    (dict(alpha=0), 'alpha'), (dict(alpha=1.5), 'alpha'), (dict(num_steps=0), 'num_steps'),
    (dict(sigma_min=10.0, sigma_max=1.0), 'sigma_min=10.0'), (dict(sigma_min=-1.0), 'sigma_min=-1.0')])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ablation_sampler(GAUSS, EPS, **kwargs)


def test_vp_betas_are_only_solved_for_the_vp_schedule():
    """A range no convex VP schedule passes through is still fine for sigma(t) = t."""
    x = ablation_sampler(GAUSS, EPS, sigma_min=1.0, sigma_max=2.0)
    assert torch.allclose(x, heun_sampler(GAUSS, EPS, sigma_min=1.0, sigma_max=2.0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='no convex VP schedule'):
        ablation_sampler(GAUSS, EPS, sigma_min=1.0, sigma_max=2.0, schedule='vp')


def test_range_outside_what_the_network_supports():
    with pytest.raises(ValueError, match='supports'):
        heun_sampler(RoundingNet(), torch.ones(2, 3), sigma_min=20.0, sigma_max=80.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu():
    latents = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    mixture = GaussianMixture(torch.tensor([0.6, 0.4]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]),
                              torch.tensor([0.3, 0.4]))
    for kwargs in (dict(), dict(solver='euler', discretization='vp', schedule='vp', scaling='vp')):
        cpu = ablation_sampler(mixture, latents, **kwargs)
        gpu = ablation_sampler(mixture.cuda(), latents.cuda(), **kwargs)
        assert gpu.device.type == 'cuda' and gpu.dtype == torch.float64
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)
