"""edm_lit.solvers (chapter 11): DPM-Solver++(2M), iPNDM (and its variable-step form), UniPC.

Every expected value is an exact answer — an Euler step, a straight line, the Adams-Bashforth and Adams-Moulton
tables, closed forms of the phi-functions, exactly integrable ODEs and the Gaussian flow, orders of convergence —
never the code's own output.
"""
import math
from fractions import Fraction

import pytest
import torch

from edm_lit.samplers import CountingDenoiser, observed_order
from edm_lit.schedules import edm_sigma_steps
from edm_lit.solvers import (GRID_SOLVERS, SOLVERS, adams_bashforth_weights, exponential_step, multistep_sampler,
                             nfe_to_reach, phi, sample_dpmpp_2m, sample_ipndm, sample_unipc, to_d, unipc_weights)
from edm_lit.toy import FiniteSetDenoiser, GaussianMixture

MU, SIGMA_DATA = 0.3, 0.5
GAUSS = GaussianMixture(*(torch.tensor(v, dtype=torch.float64) for v in ([1.0], [[MU]], [SIGMA_DATA])))  # mu exact
EPS = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
Z = torch.tensor([[0.7]], dtype=torch.float64)
SIGMA_0 = 3.0



def quartic(x, sigma, class_labels=None):
    """D = x - sigma (sigma_0 - sigma)^4: dx/dsigma = (sigma_0 - sigma)^4, x_N = x_0 - (sigma_0 - sigma_N)^5 / 5."""
    return x - sigma * (SIGMA_0 - sigma) ** 4


def sine_lambda(x, sigma, class_labels=None):
    """D = sin(lambda), lambda = -log sigma (independent of x)."""
    return torch.sin(-torch.log(torch.as_tensor(sigma, dtype=torch.float64))) * torch.ones_like(x)


def exact_sine_lambda(x_0, sigma_0, sigma_N):
    """Variation of constants (eq-solv-voc) for D = sin(lambda): e^{-(l_N - l_0)} x_0 + [e^{l - l_N}(sin - cos)/2]."""
    lam_0, lam_N = -math.log(sigma_0), -math.log(sigma_N)
    F = lambda lam: math.exp(lam - lam_N) * (math.sin(lam) - math.cos(lam)) / 2
    return math.exp(lam_0 - lam_N) * x_0 + F(lam_N) - F(lam_0)


def gaussian_flow(x_0, sigma_0, sigma_N):
    """The exact PF-ODE flow of N(MU, SIGMA_DATA^2) data (eq-ode-gauss-flow)."""
    return MU + (x_0 - MU) * math.sqrt((SIGMA_DATA**2 + sigma_N**2) / (SIGMA_DATA**2 + sigma_0**2))


PROBLEMS = {  # denoiser, latents, sigma_N, sigma_0, exact x_N for the grid s (a list)
    'polynomial': (quartic, Z, 0.5, SIGMA_0, lambda s: Z * s[0] - (s[0] - s[-1]) ** 5 / 5),
    'sin(lambda)': (sine_lambda, Z, 0.05, 20.0, lambda s: exact_sine_lambda(0.7 * s[0], s[0], s[-1])),
    'gaussian': (GAUSS, EPS, 0.002, 80.0, lambda s: gaussian_flow(EPS * s[0], s[0], s[-1])),
}


# --- the building blocks -------------------------------------------------------------------------------------------

def test_exponential_step_is_euler_in_sigma_and_exact_on_straight_lines():
    """eq-solv-ddim = x + (sigma' - sigma)(x - D)/sigma (Euler, eq-det-euler); with D = y it stays on the line to y."""
    gen = torch.Generator().manual_seed(0)
    x, D = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    for sigma_cur, sigma_next in ((80.0, 50.0), (0.7, 0.2), (0.01, 0.0)):
        euler = x + (sigma_next - sigma_cur) * to_d(x, sigma_cur, D)
        assert torch.allclose(exponential_step(x, sigma_cur, sigma_next, D), euler, rtol=1e-14, atol=1e-14)
    assert torch.equal(exponential_step(x, 0.3, 0.0, D), D)  # into sigma = 0: lands on D (eq-ode-euler-to-zero)
    y = D[:1]
    assert torch.allclose(exponential_step(y + 2.0 * x[:1], 2.0, 0.5, y), y + 0.5 * x[:1], rtol=0, atol=1e-15)


def test_to_d_is_the_ode_derivative():
    """to_d = (x - D)/sigma: for one data point y, dx/dsigma along the line x = y + sigma e is e."""
    y, e = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert torch.allclose(to_d(y + 2.5 * e, 2.5, y), e, rtol=1e-15, atol=0)


@pytest.mark.parametrize('k, table', [(1, (1,)), (2, (Fraction(3, 2), Fraction(-1, 2))),
                                      (3, (Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12))),
                                      (4, (Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)))])
def test_adams_bashforth_weights_for_equal_steps_are_the_classical_table(k, table):
    beta = adams_bashforth_weights([-j for j in range(k)])
    assert beta == pytest.approx([float(t) for t in table], abs=1e-14)


def test_adams_bashforth_weights_integrate_polynomials_on_uneven_nodes():
    """sum_j beta_j p(u_j) = int_0^1 p(u) du for every polynomial of degree < k (eq-solv-ab-moments)."""
    nodes = [0.0, -0.6, -1.5, -2.9]
    beta = adams_bashforth_weights(nodes)
    p = lambda u: 2 - 3 * u + 0.5 * u ** 2 - 1.25 * u ** 3
    assert sum(b * p(u) for b, u in zip(beta, nodes)) == pytest.approx(2 - 1.5 + 0.5 / 3 - 1.25 / 4, abs=1e-13)


@pytest.mark.parametrize('z', [-0.3, -0.999, -1.001, -2.5, -12.0, 0.5, 3.0])
def test_phi_matches_its_closed_forms(z):
    assert phi(1, z) == pytest.approx(math.expm1(z) / z, rel=1e-14)
    assert phi(2, z) == pytest.approx((math.expm1(z) - z) / z ** 2, rel=1e-12)
    assert phi(3, z) == pytest.approx((math.expm1(z) - z - z * z / 2) / z ** 3, rel=1e-11)


@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_phi_near_zero_is_its_taylor_series(k):
    """phi_k(z) = 1/k! + z/(k+1)! + z^2/(k+2)! + O(z^3): no cancellation for tiny steps."""
    for z in (0.0, -1e-6, 2e-5):
        taylor = 1 / math.factorial(k) + z / math.factorial(k + 1) + z * z / math.factorial(k + 2)
        assert phi(k, z) == pytest.approx(taylor, rel=1e-15)


def test_unipc_weights_reduce_to_adams_moulton_and_dpmpp_2m():
    """h -> 0 with equal steps: UniC-1 is the trapezoid, UniC-2 the 2-step Adams-Moulton rule (5, 8, -1)/12;
    UniP-2 is rho = 1/2, i.e. DPM-Solver++(2M)."""
    h = 1e-7
    assert unipc_weights(h, [], 1) == ([], [0.5])
    (rho_1,), (rho_past, rho_new) = unipc_weights(h, [-1.0], 2)
    assert rho_1 == 0.5
    assert [rho_new, 1 + rho_past - rho_new, -rho_past] == pytest.approx([5 / 12, 8 / 12, -1 / 12], abs=1e-6)
    rhos_p, rhos_c = unipc_weights(h, [-1.0, -2.0], 3)  # UniP-3 -> AB3 (23, -16, 5)/12
    assert [1 + rhos_p[0] + rhos_p[1] / 2, -rhos_p[0], -rhos_p[1] / 2] == pytest.approx([23 / 12, -16 / 12, 5 / 12],
                                                                                        abs=1e-6)
    weights = [rhos_c[2], 1 + rhos_c[0] + rhos_c[1] / 2 - rhos_c[2], -rhos_c[0], -rhos_c[1] / 2]  # new, i, i-1, i-2
    assert weights == pytest.approx([9 / 24, 19 / 24, -5 / 24, 1 / 24], abs=1e-6)  # UniC-3 -> 3-step Adams-Moulton


def test_unipc_weights_solve_the_order_conditions():
    """sum_k rho_k r_k^(m-1) = m! h phi_{m+1}(-h) / (1 - e^-h) (eq-solv-unipc-b), here for h = 0.8 in closed form."""
    h, rks = 0.8, [-0.7, -1.6]
    b = [h * (math.expm1(-h) + h) / h ** 2 / -math.expm1(-h),
         2 * h * (math.expm1(-h) + h - h * h / 2) / -h ** 3 / -math.expm1(-h),
         6 * h * (math.expm1(-h) + h - h * h / 2 + h ** 3 / 6) / h ** 4 / -math.expm1(-h)]
    rhos_p, rhos_c = unipc_weights(h, rks, 3)
    for m in (1, 2):
        assert sum(rho * r ** (m - 1) for rho, r in zip(rhos_p, rks)) == pytest.approx(b[m - 1], rel=1e-12)
    for m in (1, 2, 3):
        assert sum(rho * r ** (m - 1) for rho, r in zip(rhos_c, rks + [1.0])) == pytest.approx(b[m - 1], rel=1e-12)


# --- the solvers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_steps', [1, 2, 5])
@pytest.mark.parametrize('name', sorted(SOLVERS))
def test_one_point_data_is_exact_in_any_shape_with_one_nfe_per_step(name, num_steps):
    """D = y constant: the trajectories are straight (eq-det-straight) and every solver follows them exactly."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    latents = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float32)
    net = CountingDenoiser(FiniteSetDenoiser(y))
    x = SOLVERS[name](net, latents, num_steps=num_steps)
    assert x.dtype == torch.float64 and x.shape == latents.shape
    assert torch.allclose(x, y.expand_as(x), rtol=0, atol=1e-12)
    assert net.nfe == num_steps


def test_dpmpp_2m_freezes_a_lambda_affine_denoiser_at_the_lambda_midpoint():
    """D = a + b lambda: eq-solv-2m gives D_hat = D(lambda_i + h_i / 2) exactly, on any grid."""
    a, b = 0.4, -0.3
    net = lambda x, sigma, class_labels=None: (a - b * torch.log(torch.as_tensor(sigma))) * torch.ones_like(x)
    sigmas = [5.0, 2.0, 0.3, 0.1]
    x = Z * sigmas[0]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        lam, lam_next = -math.log(s), -math.log(s_next)
        D_hat = a + b * (lam if i == 0 else (lam + lam_next) / 2)  # the first step is first order
        x = s_next / s * x + (1 - s_next / s) * D_hat
    assert torch.allclose(sample_dpmpp_2m(net, Z, sigmas), x, rtol=1e-14, atol=1e-15)


def test_dpmpp_2m_on_gaussian_data_converges_to_the_exact_flow_at_second_order():
    """Grid ending at sigma = 0: the output tends to eq-det-gauss-exact (flow to sigma_min, then D) like N^-2."""
    var_min, var_max = SIGMA_DATA**2 + 0.002**2, SIGMA_DATA**2 + 80.0**2
    exact = MU + (80.0 * EPS - MU) * math.sqrt(var_min / var_max) * SIGMA_DATA**2 / var_min  # eq-det-gauss-exact
    errors = [float((multistep_sampler(GAUSS, EPS, num_steps=n) - exact).abs().max()) for n in (32, 64, 128)]
    assert 1.75 < observed_order([32, 64, 128], errors) < 2.25 and errors[-1] < 2e-3, errors


@pytest.mark.parametrize('problem, solver, rho, order', [
    ('polynomial', 'ipndm', 1, 4), ('polynomial', 'ipndm_v', 1, 4),   # uniform grid: AB4 is exact to 4th order
    ('polynomial', 'ipndm', 7, 2), ('polynomial', 'ipndm_v', 7, 4),   # non-uniform: fixed weights lose it
    ('sin(lambda)', 'dpmpp_2m', 7, 2), ('sin(lambda)', 'unipc', 7, 3),
    ('gaussian', 'dpmpp_2m', 7, 2), ('gaussian', 'ipndm', 7, 2), ('gaussian', 'unipc', 7, 3)])
def test_observed_orders_against_closed_forms(problem, solver, rho, order):
    """Grids ending at sigma_N > 0 (no denoising step): errors against exact answers fall like N^-order."""
    net, latents, sigma_N, sigma_0, exact = PROBLEMS[problem]
    steps, errors = (16, 32, 64), []
    for n in steps:
        s = edm_sigma_steps(n + 1, sigma_N, sigma_0, rho)
        errors.append(float((GRID_SOLVERS[solver](net, latents, s) - exact(s.tolist())).abs().max()))
    assert abs(observed_order(steps, errors) - order) < 0.35, errors


def test_a_single_step_into_zero_returns_the_denoiser_output():
    """Grid (sigma_0, 0): every solver returns D(sigma_0 z; sigma_0), one NFE."""
    for name, solver in GRID_SOLVERS.items():
        net = CountingDenoiser(GAUSS)
        x = solver(net, EPS, [2.0, 0.0])
        assert torch.allclose(x, MU + (2.0 * EPS - MU) * SIGMA_DATA**2 / (SIGMA_DATA**2 + 4.0), rtol=1e-14, atol=1e-15)
        assert net.nfe == 1, name


@pytest.mark.parametrize('name', sorted(SOLVERS))
def test_samples_do_not_depend_on_their_batch(name):
    """Deterministic and elementwise: sample i alone equals sample i inside a batch; class labels reach the net."""
    mixture = GaussianMixture(torch.tensor([0.6, 0.4]), torch.tensor([[-1.0, 0.5], [1.0, 0.0]]),
                              torch.tensor([0.3, 0.5]))
    seen = []

    def net(x, sigma, class_labels=None):
        seen.append(class_labels)
        return mixture(x, sigma)
    latents = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.arange(6)
    batch = SOLVERS[name](net, latents, labels, num_steps=7)
    assert all(c is labels for c in seen) and len(seen) == 7
    for i in (0, 5):
        assert torch.allclose(SOLVERS[name](net, latents[i:i + 1], labels[i:i + 1], num_steps=7), batch[i:i + 1],
                              rtol=1e-13, atol=1e-13)


def test_nfe_to_reach_ignores_early_lucky_dips():
    rows = {'nfe': [2, 3, 4, 5, 6], 'error': [0.1, 0.5, 0.2, 0.05, 0.04]}
    assert nfe_to_reach(rows, 0.15) == 5
    assert nfe_to_reach(rows, 0.6) == 2
    assert nfe_to_reach(rows, 0.01) is None


def test_registry():
    assert set(SOLVERS) == set(GRID_SOLVERS) == {'dpmpp_2m', 'ipndm', 'ipndm_v', 'unipc'}


# --- bad input ---------------------------------------------------------------------------------------------------

def test_unknown_solver_is_named():
    with pytest.raises(ValueError, match="unknown solver 'dpm_fast'.*dpmpp_2m"):
        multistep_sampler(GAUSS, EPS, solver='dpm_fast')


@pytest.mark.parametrize('name', sorted(SOLVERS))
@pytest.mark.parametrize('num_steps', [0, -3, 2.5])
def test_bad_num_steps(name, num_steps):
    with pytest.raises(ValueError, match='num_steps'):
        SOLVERS[name](GAUSS, EPS, num_steps=num_steps)


@pytest.mark.parametrize('solver', [sample_dpmpp_2m, sample_ipndm, sample_unipc])
@pytest.mark.parametrize('sigmas, message', [
    ([80.0], 'at least 2'), ([], 'at least 2'), ([[80.0, 0.0]], '1-D'),
    ([80.0, 10.0, 20.0, 0.0], 'strictly decreasing'), ([80.0, 0.0, 0.0], 'strictly decreasing'),
    ([1.0, -1.0], '>= 0'), ([80.0, float('nan'), 0.0], 'finite'), ([float('inf'), 1.0, 0.0], 'finite')])
def test_bad_sigma_grids(solver, sigmas, message):
    with pytest.raises(ValueError, match=message):
        solver(GAUSS, EPS, sigmas)


@pytest.mark.parametrize('kwargs', [dict(max_order=0), dict(max_order=5), dict(max_order=2.0), dict(max_order=True)])
def test_bad_ipndm_order(kwargs):
    with pytest.raises(ValueError, match='max_order'):
        sample_ipndm(GAUSS, EPS, [80.0, 1.0, 0.0], **kwargs)


@pytest.mark.parametrize('order', [0, 4, None])
def test_bad_unipc_order(order):
    with pytest.raises(ValueError, match='order'):
        sample_unipc(GAUSS, EPS, [80.0, 1.0, 0.0], order=order)


def test_bad_adams_bashforth_nodes_and_targets():
    with pytest.raises(ValueError, match='distinct'):
        adams_bashforth_weights([0.0, -1.0, -1.0])
    with pytest.raises(ValueError, match='at least one'):
        adams_bashforth_weights([])
    with pytest.raises(ValueError, match='target'):
        nfe_to_reach({'nfe': [2], 'error': [0.1]}, 0.0)
