"""edm_lit.ddpm (chapter 12): β schedules, the forward process, ᾱ ↔ σ, ε-prediction and DDIM, against exact answers."""
import math

import pytest
import torch

from edm_lit.ddpm import (EpsPrecond, alpha_bar, alpha_bar_from_sigma, ancestral_sampler, ancestral_step,
                          cosine_alpha_bar, cosine_betas, ddim_sampler, ddim_step, ddpm_betas, elbo_weight,
                          linear_betas, q_posterior, q_sample, q_step, sigma_from_alpha_bar)
from edm_lit.samplers import integrate
from edm_lit.schedules import EDM, VP, edm_sigma_steps, ode_derivative, vp_sigma
from edm_lit.toy import GaussianMixture, ring_mixture

F64 = torch.float64


def test_linear_schedule_of_ho_et_al():
    betas = ddpm_betas('linear')
    assert betas.shape == (1000,) and betas.dtype == F64
    assert betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-17
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64), rtol=1e-9, atol=0)


def test_cosine_schedule_product_formula():
    """Nichol & Dhariwal Eq. 17: prod (1 - beta_i) = f(t)/f(0) wherever the clip at 0.999 is inactive."""
    betas = cosine_betas(1000)
    a = alpha_bar(betas)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 10, 500, 990, 999):
        assert abs(a[t - 1].item() - f(t) / f(0)) < 1e-12 * max(1.0, f(t) / f(0))
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()
    assert torch.allclose(cosine_alpha_bar(torch.arange(3)), torch.tensor([1.0, f(1) / f(0), f(2) / f(0)], dtype=F64))


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_moments_of_the_chain_match_the_closed_form(schedule):
    """Iterating q(x_t | x_{t-1}) moves mean and variance as sqrt(abar) m_0 and abar v_0 + 1 - abar (Ho et al. Eq. 4)."""
    betas = ddpm_betas(schedule)
    a = alpha_bar(betas)
    m, v, m_0, v_0 = 0.7, 0.05, 0.7, 0.05
    for t, beta in enumerate(betas.tolist()):
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
        if t in (0, 99, 999):
            assert abs(m - math.sqrt(a[t]) * m_0) < 1e-14 and abs(v - (a[t] * v_0 + 1 - a[t])) < 1e-13


def test_iterated_and_closed_form_samples_agree():
    mixture = ring_mixture(8, 0.7, 0.05)
    g = torch.Generator().manual_seed(0)
    x_0 = mixture.sample(20_000, generator=g)
    betas = linear_betas(100, 1e-3, 0.05)
    a = alpha_bar(betas)
    x_t = x_0
    for beta in betas: x_t = q_step(x_t, beta, torch.randn(x_0.shape, generator=g, dtype=F64))
    exact_cov = a[-1] * mixture.cov + (1 - a[-1]) * torch.eye(2, dtype=F64)
    se = 5 * math.sqrt(2 / len(x_0))
    assert (x_t.mean(0)).abs().max() < se and (x_t.T.cov() - exact_cov).abs().max() < se
    jumped = q_sample(x_0, a[-1], torch.randn(x_0.shape, generator=g, dtype=F64))
    assert (jumped.T.cov() - exact_cov).abs().max() < se
    per_sample = q_sample(x_0[:3], a[[0, 50, 99]], torch.zeros(3, 2, dtype=F64))  # one abar per sample
    assert torch.allclose(per_sample, a[[0, 50, 99]].sqrt()[:, None] * x_0[:3])


def test_alpha_bar_sigma_round_trip_and_scaling():
    a = alpha_bar(ddpm_betas('linear'))
    sigma = sigma_from_alpha_bar(a)
    assert torch.allclose(alpha_bar_from_sigma(sigma), a, rtol=1e-15, atol=0)
    assert sigma_from_alpha_bar(1.0) == 0 and alpha_bar_from_sigma(0.0) == 1 and alpha_bar_from_sigma(3.0) == 0.1
    assert abs(sigma_from_alpha_bar(0.2) - 2.0) < 1e-15
    x_0, eps = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert torch.allclose(q_sample(x_0, a[300], eps), a[300].sqrt() * (x_0 + sigma[300] * eps), rtol=1e-14, atol=1e-14)
    t = torch.linspace(0.001, 1, 50, dtype=F64)
    assert torch.allclose(VP.s(t), alpha_bar_from_sigma(VP.sigma(t)).sqrt(), rtol=1e-14, atol=0)


def test_linear_schedule_converges_to_vp_at_first_order():
    """beta_t = (beta_min + beta_d (t-1)/(T-1)) / T discretises VP(beta_d = 19.9, beta_min = 0.1): error ~ 1/T."""
    def gap(T):
        sigma = sigma_from_alpha_bar(alpha_bar(linear_betas(T, 0.1 / T, 20.0 / T)))
        return ((sigma ** 2).log1p() - (vp_sigma(torch.arange(1, T + 1) / T) ** 2).log1p()).abs().max().item()
    g = [gap(T) for T in (500, 1000, 2000)]
    assert 1.9 < g[0] / g[1] < 2.1 and 1.9 < g[1] / g[2] < 2.1


class IdealEps(torch.nn.Module):
    """The exact epsilon-network of a mixture, from DDPM inputs (x_t, 0-based step) only."""
    def __init__(self, mixture, sigmas):
        super().__init__()
        self.mixture, self.sigmas = mixture, sigmas

    def forward(self, x_t, t, class_labels=None, augment_labels=None):
        sigma = self.sigmas[t.long()][:, None]
        return (-sigma * self.mixture.score(x_t.double() * (1 + sigma ** 2).sqrt(), sigma)).float()


def test_eps_precond_turns_an_eps_network_into_the_denoiser():
    mixture = ring_mixture(8, 0.7, 0.05)
    a = alpha_bar(ddpm_betas('cosine'))
    sigmas = sigma_from_alpha_bar(a)
    net = EpsPrecond(IdealEps(mixture, sigmas), a)
    steps = torch.tensor([0, 5, 250, 600, 900])
    sigma = sigmas[steps][:, None]
    x = mixture.sample(5, generator=torch.Generator().manual_seed(0)) + sigma * torch.randn(5, 2, dtype=F64)
    D_x = net(x, sigmas[steps] * 1.00001).double()  # slightly off-grid: snapped to the step
    assert torch.allclose((x - D_x) / sigma, (x - mixture.denoiser(x, sigma)) / sigma, rtol=0, atol=1e-5)
    assert net.coefficients(sigmas[steps] * 1.00001)[3].tolist() == steps.tolist()
    assert torch.equal(net.round_sigma(sigmas[steps] * 0.99999), sigmas[steps])
    assert (net.sigma_min, net.sigma_max) == (sigmas[0].item(), sigmas[-1].item())


def test_ddim_step_is_exact_for_the_true_noise():
    """If eps is the noise that made x_t from x_0, DDIM lands on sqrt(abar') x_0 + sqrt(1 - abar') eps exactly."""
    x_0, eps = torch.randn(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    a_t, a_next = torch.tensor(0.3, dtype=F64), torch.tensor(0.8, dtype=F64)
    got = ddim_step(q_sample(x_0, a_t, eps), eps, a_t, a_next)
    assert torch.allclose(got, q_sample(x_0, a_next, eps), rtol=1e-14, atol=1e-14)


def test_ddim_equals_euler_on_the_sigma_ode():
    mixture = ring_mixture(8, 0.7, 0.05)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigma_steps = edm_sigma_steps(12)
    t_steps = torch.cat([sigma_steps, torch.zeros(1, dtype=F64)])  # sigma(t) = t, s(t) = 1
    x = integrate(lambda x, t: ode_derivative(x, t, mixture, EDM), z * sigma_steps[0], t_steps, solver='euler')
    assert (ddim_sampler(mixture, z, sigma_steps) - x).abs().max() < 1e-12


def test_ddim_converges_at_first_order_to_the_gaussian_flow():
    """Gaussian data N(0, s^2): the ODE solution is x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2) exactly."""
    s = 0.5
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.full((1,), s))
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    exact = z * 80 * s / math.sqrt(s ** 2 + 80 ** 2)
    err = [(ddim_sampler(gaussian, z, edm_sigma_steps(n)) - exact).abs().max().item() for n in (32, 64, 128)]
    assert 1.8 < err[0] / err[1] < 2.2 and 1.8 < err[1] / err[2] < 2.2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"): ddpm_betas('quadratic')
    with pytest.raises(ValueError, match='T must be'): ddpm_betas('linear', T=0)
    with pytest.raises(ValueError, match='beta_start'): linear_betas(10, 0.5, 0.1)
    with pytest.raises(ValueError, match='s must be > 0'): cosine_betas(10, s=-1)
    with pytest.raises(ValueError, match='every beta'): alpha_bar(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match='alpha_bar must lie in'): sigma_from_alpha_bar(torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match='sigma must be >= 0'): alpha_bar_from_sigma(-1.0)
    with pytest.raises(ValueError, match='decrease strictly'): EpsPrecond(torch.nn.Identity(), torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match='strictly decreasing'): ddim_sampler(None, torch.zeros(2, 2), [1.0, 2.0])
    with pytest.raises(ValueError, match='batch of 2'): q_sample(torch.zeros(2, 2), torch.ones(3) * 0.5, torch.zeros(2, 2))


@pytest.mark.parametrize('t', [1, 2, 10, 500, 1000])
def test_posterior_is_gaussian_conditioning(t):
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0, conditioned the textbook way."""
    a = alpha_bar(linear_betas())
    a_prev, a_t = (a[t - 2] if t > 1 else torch.tensor(1.0, dtype=F64)), a[t - 1]
    alpha_t = a_t / a_prev
    x_0, x_t = torch.tensor([[0.7], [-1.3]], dtype=F64), torch.tensor([[0.2], [2.5]], dtype=F64)
    cov, var_t, var_prev = alpha_t.sqrt() * (1 - a_prev), 1 - a_t, 1 - a_prev  # Cov(x_{t-1}, x_t), Var x_t, Var x_{t-1}
    mean = a_prev.sqrt() * x_0 + cov / var_t * (x_t - a_t.sqrt() * x_0)
    got_mean, got_var = q_posterior(x_0, x_t, a_prev, a_t)
    assert torch.allclose(got_mean, mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_var.reshape(-1)[0], var_prev - cov ** 2 / var_t, rtol=1e-9, atol=1e-15)
    if t == 1: assert torch.equal(got_mean, x_0) and got_var.abs().max() == 0  # ᾱ_0 = 1: the point x_0


def test_elbo_weights_telescope():
    """sum_t λ_t = (1/σ_1² − 1/σ_T²) / 2 over any grid, every λ_t > 0 on a decreasing-σ chain."""
    sigma = sigma_from_alpha_bar(alpha_bar(linear_betas()))  # increasing with t
    lam = elbo_weight(sigma[:-1], sigma[1:])
    assert (lam > 0).all()
    assert lam.sum().item() == pytest.approx(0.5 * (1 / sigma[0] ** 2 - 1 / sigma[-1] ** 2).item(), rel=1e-12)


def test_ancestral_step_ends_and_no_move():
    x, D_x, z = (torch.randn(3, 2, generator=torch.Generator().manual_seed(k), dtype=F64) for k in range(3))
    assert torch.equal(ancestral_step(x, D_x, 2.0, 0.0, z), D_x)  # σ' = 0: the denoised image, no noise
    assert torch.allclose(ancestral_step(x, D_x, 2.0, 2.0, z), x, atol=1e-15)  # σ' = σ: nothing moves
    per_sample_sigma = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    got = ancestral_step(x, D_x, per_sample_sigma, per_sample_sigma / 2, z)
    for i in range(3):
        assert torch.allclose(got[i], ancestral_step(x[i:i + 1], D_x[i:i + 1], per_sample_sigma[i],
                                                     per_sample_sigma[i] / 2, z[i:i + 1])[0])


def test_ancestral_sampler_lands_on_a_point_mass_and_checks_its_grid():
    point = GaussianMixture([1.0], [[0.25, -0.5]], [1e-9])
    x = ancestral_sampler(point, torch.randn(64, 2, dtype=F64), edm_sigma_steps(10))
    assert (x - torch.tensor([0.25, -0.5], dtype=F64)).abs().max() < 1e-8
    for bad in ([1.0, 2.0], [1.0, 0.0], [1.0, 1.0]):
        with pytest.raises(ValueError, match='strictly decreasing'):
            ancestral_sampler(point, torch.randn(4, 2), bad)
