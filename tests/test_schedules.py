"""edm_lit.schedules against exact answers: Table 1 closed forms, inverses, derivatives, grids and Gaussian flows.

Every expected value is computed here from the paper's formulas (with `math`, independently of the module); the
Gaussian-data tests compare the integrated ODE with its closed-form solution (chapter 2, eq-ode-gauss-flow-general).
"""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from edm_lit.schedules import (DEFAULT_SIGMA_RANGE, DISCRETIZATIONS, EDM, SCALINGS, SCHEDULES, VE, VP, Schedule,
                               default_sigma_range, edm_sigma_steps, iddpm_sigma_steps, iddpm_u, make_schedule,
                               ode_derivative,
                               sigma_steps, ve_sigma_steps, vp_betas, vp_sigma_steps)

F64 = torch.float64



COMBOS = list(itertools.product(SCHEDULES, SCALINGS))  # every schedule × scaling the ablation sampler allows


def gamma(t, beta_d=19.9, beta_min=0.1):
    """½ β_d t² + β_min t, the exponent of the VP schedule (Table 1)."""
    return 0.5 * beta_d * t * t + beta_min * t


def vp_sigma_exact(t, beta_d=19.9, beta_min=0.1):
    return math.sqrt(math.exp(gamma(t, beta_d, beta_min)) - 1)


# ---------------------------------------------------------------------------------------------------------------
# σ(t), σ'(t), σ⁻¹, s(t), s'(t)

@pytest.mark.parametrize('t', [1e-3, 0.05, 0.5, 1.0, 2.0])
def test_table1_closed_forms(t):
    g, g_dot = gamma(t), 19.9 * t + 0.1
    sigma = vp_sigma_exact(t)
    assert math.isclose(float(VP.sigma(t)), sigma, rel_tol=1e-12)
    assert math.isclose(float(VP.sigma_deriv(t)), g_dot * math.exp(g) / (2 * sigma), rel_tol=1e-12)
    assert math.isclose(float(VP.s(t)), math.exp(-g / 2), rel_tol=1e-12)
    assert math.isclose(float(VP.s_deriv(t)), -g_dot / 2 * math.exp(-g / 2), rel_tol=1e-10)
    assert math.isclose(float(VE.sigma(t)), math.sqrt(t), rel_tol=1e-15)
    assert math.isclose(float(VE.sigma_deriv(t)), 0.5 / math.sqrt(t), rel_tol=1e-15)
    assert float(EDM.sigma(t)) == t and float(EDM.sigma_deriv(t)) == 1.0
    for sched in (VE, EDM):
        assert float(sched.s(t)) == 1.0 and float(sched.s_deriv(t)) == 0.0


def test_vp_constants_are_not_swapped():
    sched = make_schedule('vp', 'vp', beta_d=10.0, beta_min=1.0)
    assert math.isclose(float(sched.sigma(0.3)), vp_sigma_exact(0.3, 10.0, 1.0), rel_tol=1e-12)
    assert math.isclose(float(sched.sigma_inv(vp_sigma_exact(0.3, 10.0, 1.0))), 0.3, rel_tol=1e-12)


def test_inverse_closed_forms():
    assert float(VE.sigma_inv(3.0)) == 9.0 and float(EDM.sigma_inv(3.0)) == 3.0
    t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + 2.0 ** 2)) - 0.1) / 19.9  # positive root, Table 1
    assert math.isclose(float(VP.sigma_inv(2.0)), t, rel_tol=1e-14)


@pytest.mark.parametrize('schedule, scaling', COMBOS)
def test_inverse_roundtrip(schedule, scaling):
    sched = make_schedule(schedule, scaling)
    sigma = torch.logspace(-5, 4, 91, dtype=F64)
    assert torch.allclose(sched.sigma(sched.sigma_inv(sigma)), sigma, rtol=1e-10, atol=0)
    t = sched.sigma_inv(sigma)
    assert torch.allclose(sched.sigma_inv(sched.sigma(t)), t, rtol=1e-10, atol=0)
    assert bool((t[1:] > t[:-1]).all())  # σ⁻¹ is increasing


@pytest.mark.parametrize('schedule, scaling', COMBOS + [('vp-edm-range', 'vp')])
def test_derivatives_match_central_differences(schedule, scaling):
    sched = (make_schedule('vp', 'vp', *vp_betas(0.002, 80)) if schedule == 'vp-edm-range'
             else make_schedule(schedule, scaling))
    t = sched.sigma_inv(torch.logspace(-3, 2.5, 23, dtype=F64))
    h = 1e-4 * t
    for f, f_deriv in ((sched.sigma, sched.sigma_deriv), (sched.s, sched.s_deriv)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        tolerance = 1e-6 * f_deriv(t).abs() + 1e-14 * f(t).abs() / h  # truncation O(h²) + rounding O(eps f / h)
        assert bool(((f_deriv(t) - fd).abs() <= tolerance).all()), sched.name


def test_schedule_accepts_numbers_and_keeps_float32():
    assert VP.sigma(1).dtype == F64 and VE.sigma_inv(2).dtype == F64
    t = torch.tensor([0.5, 1.0], dtype=torch.float32)
    for sched in (VP, VE, EDM):
        for f in (sched.sigma, sched.sigma_deriv, sched.s, sched.s_deriv):
            assert f(t).dtype == torch.float32 and f(t).shape == t.shape, sched.name


def test_presets():
    assert isinstance(VP, Schedule) and dataclasses.is_dataclass(VP)
    assert VP.name.startswith('vp') and VE.name.startswith('ve') and EDM.name.startswith('linear')
    with pytest.raises(dataclasses.FrozenInstanceError):
        VP.name = 'other'


# ---------------------------------------------------------------------------------------------------------------
# Time discretizations

@pytest.mark.parametrize('num_steps', [2, 5, 18, 256])
@pytest.mark.parametrize('rho', [1, 3, 7, 20])
def test_edm_steps_eq5(num_steps, rho):
    steps = edm_sigma_steps(num_steps, 0.002, 80, rho)
    assert steps.dtype == F64 and steps.shape == (num_steps,)
    assert math.isclose(steps[0], 80, rel_tol=1e-12) and math.isclose(steps[-1], 0.002, rel_tol=1e-9)
    assert bool((steps[1:] < steps[:-1]).all())
    i = np.arange(num_steps)
    expected = (80 ** (1 / rho) + i / (num_steps - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho  # Eq. 5
    assert np.allclose(steps.numpy(), expected, rtol=1e-12, atol=0)


def test_edm_steps_limits():
    n, i = 18, np.arange(18)
    assert np.allclose(edm_sigma_steps(n, 0.002, 80, rho=1).numpy(), np.linspace(80, 0.002, n), rtol=1e-12)
    geometric = 80.0 ** (1 - i / (n - 1)) * 0.002 ** (i / (n - 1))  # ρ → ∞, eq-ode-rho-limit
    assert np.allclose(edm_sigma_steps(n, 0.002, 80, rho=1e7).numpy(), geometric, rtol=1e-5)
    assert torch.equal(edm_sigma_steps(1), torch.tensor([80.0], dtype=F64))


@pytest.mark.parametrize('num_steps', [1, 2, 18, 100])
def test_ve_steps_are_geometric(num_steps):
    steps = ve_sigma_steps(num_steps)
    i = np.arange(num_steps)
    expected = 100.0 * (0.02 / 100.0) ** (i / max(num_steps - 1, 1))
    assert np.allclose(steps.numpy(), expected, rtol=1e-12, atol=0)
    assert steps.dtype == F64 and bool((steps[1:] < steps[:-1]).all())


def test_vp_default_range_and_betas():
    """generate.py at 008a4e5: vp_sigma(beta_d=19.9, beta_min=0.1) at t = epsilon_s and t = 1 (not the 19.1 typo)."""
    sigma_min, sigma_max = DEFAULT_SIGMA_RANGE['vp']
    assert math.isclose(sigma_min, vp_sigma_exact(1e-3, 19.9, 0.1), rel_tol=1e-12)
    assert math.isclose(sigma_max, vp_sigma_exact(1.0, 19.9, 0.1), rel_tol=1e-12)
    assert abs(sigma_max - 152.17) < 5e-3 and abs(sigma_min - 0.010486) < 5e-7
    beta_d, beta_min = vp_betas(sigma_min, sigma_max, 1e-3)
    assert math.isclose(beta_d, 19.9, rel_tol=1e-9) and math.isclose(beta_min, 0.1, rel_tol=1e-7)
    assert DEFAULT_SIGMA_RANGE['ve'] == (0.02, 100) and DEFAULT_SIGMA_RANGE['iddpm'] == (0.002, 81)
    assert DEFAULT_SIGMA_RANGE['edm'] == (0.002, 80)


@pytest.mark.parametrize('epsilon_s', [1e-3, 1e-2, 0.2])
def test_vp_default_range_follows_epsilon_s(epsilon_s):
    """The official default sigma_min is vp_sigma(19.9, 0.1)(epsilon_s) for the epsilon_s passed, not for 1e-3."""
    lo, hi = default_sigma_range('vp', epsilon_s)
    assert math.isclose(lo, vp_sigma_exact(epsilon_s, 19.9, 0.1), rel_tol=1e-12)
    assert math.isclose(hi, vp_sigma_exact(1.0, 19.9, 0.1), rel_tol=1e-12)
    steps = vp_sigma_steps(18, epsilon_s=epsilon_s)
    assert math.isclose(steps[-1], lo, rel_tol=1e-9) and math.isclose(steps[0], hi, rel_tol=1e-12)
    assert default_sigma_range('edm', epsilon_s) == (0.002, 80)
    with pytest.raises(ValueError, match='bogus'): default_sigma_range('bogus')


@pytest.mark.parametrize('sigma_min, sigma_max, epsilon_s', [(0.002, 80, 1e-3), (0.01, 50, 1e-2), (0.1, 1.0, 0.2)])
def test_vp_betas_hit_the_range(sigma_min, sigma_max, epsilon_s):
    beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
    assert math.isclose(vp_sigma_exact(epsilon_s, beta_d, beta_min), sigma_min, rel_tol=1e-9)
    assert math.isclose(vp_sigma_exact(1.0, beta_d, beta_min), sigma_max, rel_tol=1e-12)


@pytest.mark.parametrize('num_steps', [2, 18, 64])
def test_vp_steps_uniform_in_t(num_steps):
    for sigma_min, sigma_max, epsilon_s in ((None, None, 1e-3), (0.002, 80, 1e-3), (0.05, 20, 0.05)):
        steps = vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s)
        lo, hi = DEFAULT_SIGMA_RANGE['vp'] if sigma_min is None else (sigma_min, sigma_max)
        beta_d, beta_min = vp_betas(lo, hi, epsilon_s)
        t = 1 + np.arange(num_steps) / (num_steps - 1) * (epsilon_s - 1)  # Table 1, VP t_i
        expected = [vp_sigma_exact(ti, beta_d, beta_min) for ti in t]
        assert np.allclose(steps.numpy(), expected, rtol=1e-9, atol=0)
        assert math.isclose(steps[0], hi, rel_tol=1e-12) and math.isclose(steps[-1], lo, rel_tol=1e-9)


def alpha_bar(j, M=1000, C_2=0.008):
    return math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2


def test_iddpm_u_closed_form():
    u = iddpm_u().numpy()
    assert u.shape == (1001,) and u[-1] == 0
    closed = [math.sqrt(alpha_bar(1000) / alpha_bar(j) - 1) for j in range(1, 1001)]  # eq-ode-iddpm-closed
    assert np.allclose(u[1:], closed, rtol=1e-10, atol=1e-15)
    assert math.isclose(u[0], math.sqrt((u[1] ** 2 + 1) / 0.001 - 1), rel_tol=1e-12)  # the C_1 clamp at j = 1
    assert bool((np.diff(u) < 0).all())


@pytest.mark.parametrize('num_steps', [1, 2, 18, 64, 992])
def test_iddpm_steps_table1(num_steps):
    u = [math.sqrt(alpha_bar(1000) / alpha_bar(j) - 1) for j in range(1, 1001)]
    j_0 = 1 + sum(x > 81 for x in u)
    assert j_0 == 8  # the paper's j_0
    if num_steps > 1 and (num_steps - 1) % 2 == 1:  # odd N − 1: no rounding ties, so Table 1's floor(· + ½) applies
        j = [math.floor(j_0 + (1000 - 1 - j_0) / (num_steps - 1) * i + 0.5) for i in range(num_steps)]
        assert np.allclose(iddpm_sigma_steps(num_steps).numpy(), [u[k - 1] for k in j], rtol=1e-10)
    steps = iddpm_sigma_steps(num_steps)
    assert steps.dtype == F64 and steps.shape == (num_steps,) and bool((steps[1:] < steps[:-1]).all())
    assert math.isclose(steps[0], u[j_0 - 1], rel_tol=1e-10)  # u_8, the largest level ≤ 81
    if num_steps > 1: assert math.isclose(steps[-1], u[998], rel_tol=1e-10)  # u_999, the smallest level ≥ 0.002


def test_iddpm_custom_range():
    steps = iddpm_sigma_steps(10, sigma_min=0.5, sigma_max=5.0)
    assert float(steps.max()) <= 5.0 and float(steps.min()) >= 0.5
    u = iddpm_u().numpy()
    inside = u[(u >= 0.5) & (u <= 5.0)]
    assert math.isclose(steps[0], inside.max(), rel_tol=1e-15) and math.isclose(steps[-1], inside.min(), rel_tol=1e-15)


@pytest.mark.parametrize('name', ['vp', 've', 'iddpm', 'edm'])
def test_dispatcher(name):
    assert torch.equal(sigma_steps(name, 18), DISCRETIZATIONS[name](18))
    lo, hi = DEFAULT_SIGMA_RANGE[name]
    steps = sigma_steps(name, 18)
    assert lo <= float(steps.min()) * (1 + 1e-9) and float(steps.max()) <= hi * (1 + 1e-12)
    assert torch.equal(sigma_steps('edm', 7, rho=3, sigma_max=10), edm_sigma_steps(7, 0.002, 10, 3))


# ---------------------------------------------------------------------------------------------------------------
# The probability-flow ODE on Gaussian data N(mu, sigma_data² I)

MU, SIGMA_DATA = torch.tensor([1.0, -0.5], dtype=F64), 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    """Ideal denoiser of N(MU, SIGMA_DATA² I): MU + SIGMA_DATA² / (SIGMA_DATA² + σ²) (x − MU)."""
    mu = MU.to(x.device, x.dtype)
    return mu + SIGMA_DATA ** 2 / (SIGMA_DATA ** 2 + sigma ** 2) * (x - mu)


def exact_flow(x_start, t, t_start, sched):
    """x(t) = s(t) [μ + sqrt((σ_data² + σ(t)²) / (σ_data² + σ(t_start)²)) (x_start / s(t_start) − μ)]."""
    sigma, sigma_start = float(sched.sigma(t)), float(sched.sigma(t_start))
    ratio = math.sqrt((SIGMA_DATA ** 2 + sigma ** 2) / (SIGMA_DATA ** 2 + sigma_start ** 2))
    return float(sched.s(t)) * (MU + ratio * (x_start / float(sched.s(t_start)) - MU))


def rk4_end(sched, x, ts):
    """Integrate dx/dt = ode_derivative along ts with classical RK4; return the final state."""
    f = lambda x, t: ode_derivative(x, t, gaussian_denoiser, sched)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t_cur
        k1 = f(x, t_cur); k2 = f(x + h / 2 * k1, t_cur + h / 2)
        k3 = f(x + h / 2 * k2, t_cur + h / 2); k4 = f(x + h * k3, t_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def flow_errors(sched, sigma_min=0.01, sigma_max=50.0, n=64, steps=(100, 200)):
    """Max error of RK4 vs the exact flow from σ_max to σ_min, for two step counts (EDM-placed time steps)."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = []
    for num_steps in steps:
        ts = sched.sigma_inv(edm_sigma_steps(num_steps, sigma_min, sigma_max))
        x_start = z * sigma_max * float(sched.s(ts[0]))
        errors.append(float((rk4_end(sched, x_start, ts) - exact_flow(x_start, ts[-1], ts[0], sched)).abs().max()))
    return errors


@pytest.mark.parametrize('schedule, scaling', COMBOS)
def test_ode_matches_exact_gaussian_flow_with_order_4(schedule, scaling):
    e_coarse, e_fine = flow_errors(make_schedule(schedule, scaling))
    assert e_fine < 1e-5 * SIGMA_DATA
    assert 3.5 < math.log2(e_coarse / e_fine) < 4.5, (e_coarse, e_fine)


@pytest.mark.parametrize('field, wrong', [
    ('s_deriv', lambda sched: lambda t: -sched.s_deriv(t)),                 # wrong sign of s'
    ('sigma_deriv', lambda sched: lambda t: 2 * sched.sigma_deriv(t)),      # wrong constant in σ'
    ('s', lambda sched: lambda t: sched.s(t) ** 2),                         # wrong scaling
])
def test_flow_check_detects_wrong_schedules(field, wrong):
    """The Gaussian-flow check is sensitive: a wrong sign or constant makes it fail by orders of magnitude."""
    broken = dataclasses.replace(VP, **{field: wrong(VP)})
    assert flow_errors(broken, steps=(50,))[0] > 1e-2


@pytest.mark.parametrize('sched, sigma_min, sigma_max', [(VP, None, None), (VE, 0.02, 100.0), (EDM, 0.002, 80.0)])
def test_ode_maps_noise_to_data_distribution(sched, sigma_min, sigma_max):
    """x ~ N(0, s(t_max)² σ_max² I) integrated to σ_min has mean μ (± 0.05) and variance σ_data² (± 10 %)."""
    if sched is VP: sigma_min, sigma_max = float(VP.sigma(1e-3)), float(VP.sigma(1.0))
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = sched.sigma_inv(edm_sigma_steps(150, sigma_min, sigma_max))
    x_end = rk4_end(sched, z * sigma_max * sched.s(ts[0]), ts) / sched.s(ts[-1])
    assert float((x_end.mean(0) - MU).abs().max()) < 0.05
    assert abs(float(x_end.var(0).mean()) / SIGMA_DATA ** 2 - 1) < 0.1


@pytest.mark.parametrize('t', [0.01, 1.0, 80.0])
def test_edm_tangent_points_at_denoiser(t):
    """For σ(t) = t, s = 1: dx/dt = (x − D)/t, so one Euler step to t = 0 lands on D(x; t) (eq-ode-euler-to-zero)."""
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * (1 + t)
    t = torch.tensor(t, dtype=F64)
    d = ode_derivative(x, t, gaussian_denoiser, EDM)
    D_x = gaussian_denoiser(x, t)
    assert torch.allclose(x - t * d, D_x, rtol=0, atol=1e-12 * float(x.abs().max()))


def test_ode_general_formula_vp():
    """VP: (σ'/σ + s'/s) x − (σ' s / σ) D(x/s; σ), with every factor from the closed forms of Table 1."""
    t, x = 0.4, torch.tensor([[0.3, -1.2]], dtype=F64)
    g, g_dot = gamma(t), 19.9 * t + 0.1
    sigma, s = vp_sigma_exact(t), math.exp(-g / 2)
    sigma_dot, s_dot = g_dot * math.exp(g) / (2 * sigma), -g_dot / 2 * s
    expected = (sigma_dot / sigma + s_dot / s) * x - sigma_dot * s / sigma * gaussian_denoiser(x / s, sigma)
    assert torch.allclose(ode_derivative(x, torch.tensor(t, dtype=F64), gaussian_denoiser, VP), expected, rtol=1e-12)


def test_ode_dtype_device_and_labels():
    seen = {}

    def net(x, sigma, class_labels=None):
        seen['labels'], seen['sigma'] = class_labels, sigma
        return gaussian_denoiser(x, sigma)

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2])
    d = ode_derivative(x, 2.0, net, VP, class_labels=labels)
    assert d.dtype == torch.float32 and d.shape == x.shape and seen['labels'] is labels
    assert seen['sigma'].ndim == 0 and math.isclose(float(seen['sigma']), vp_sigma_exact(2.0), rel_tol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_ode_on_cuda(dtype):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for sched in (VP, VE, EDM):
        ref = ode_derivative(x, 0.7, gaussian_denoiser, sched)
        got = ode_derivative(x.to('cuda', dtype), torch.tensor(0.7, device='cuda'), gaussian_denoiser, sched)
        assert got.device.type == 'cuda' and got.dtype == dtype
        assert torch.allclose(got.cpu().double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors that name the bad value

@pytest.mark.parametrize('call, match', [
    (lambda: make_schedule('cosine'), "'cosine'"),
    (lambda: make_schedule('vp', 'half'), "'half'"),
    (lambda: make_schedule('vp', 'vp', beta_d=0.0), 'beta_d=0.0'),
    (lambda: make_schedule('vp', 'vp', beta_min=float('nan')), 'beta_min=nan'),
    (lambda: sigma_steps('karras', 10), "'karras'"),
    (lambda: edm_sigma_steps(0), 'num_steps.*0'),
    (lambda: edm_sigma_steps(2.5), 'num_steps.*2.5'),
    (lambda: ve_sigma_steps(-3), 'num_steps.*-3'),
    (lambda: edm_sigma_steps(10, sigma_min=0.0), 'sigma_min.*0.0'),
    (lambda: edm_sigma_steps(10, sigma_min=-1.0), 'sigma_min.*-1.0'),
    (lambda: edm_sigma_steps(10, sigma_min=80, sigma_max=80), 'sigma_max=80'),
    (lambda: ve_sigma_steps(10, sigma_min=5, sigma_max=1), 'sigma_min=5'),
    (lambda: edm_sigma_steps(10, rho=0), 'rho.*0'),
    (lambda: edm_sigma_steps(10, rho=-7), 'rho.*-7'),
    (lambda: vp_sigma_steps(10, epsilon_s=0.0), 'epsilon_s.*0.0'),
    (lambda: vp_sigma_steps(10, epsilon_s=1.0), 'epsilon_s.*1.0'),
    (lambda: vp_betas(50.0, 80.0), 'beta_d'),
    (lambda: iddpm_sigma_steps(2000), 'num_steps=2000'),
    (lambda: iddpm_sigma_steps(10, M=0), 'M.*0'),
    (lambda: iddpm_sigma_steps(10, C_1=0.0), 'C_1=0.0'),
    (lambda: VP.sigma_inv(torch.tensor([1.0, -2.0])), 'sigma.*-2'),
    (lambda: VE.sigma(-1.0), 't.*-1'),
    (lambda: EDM.sigma(torch.tensor([-0.5])), 't.*-0.5'),
    (lambda: EDM.sigma_inv(-0.5), 'sigma.*-0.5'),
    (lambda: ode_derivative(torch.zeros(2, 2), 0.0, gaussian_denoiser, EDM), 'sigma=0'),
    (lambda: ode_derivative(torch.zeros(2, 2), torch.tensor([1.0, 2.0]), gaussian_denoiser, EDM), r'shape \(2,\)'),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
