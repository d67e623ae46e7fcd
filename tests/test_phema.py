"""edm_lit.phema (chapter 14): post-hoc EMA against exact answers — the width of a power-function profile, the
update's weights, the closed-form inner product, the reconstruction of stored and constant averages, bad input."""
import math

import numpy as np
import pytest
import torch

from edm_lit.phema import PowerEMA, exp_to_std, power_ema_beta, profile_inner, reconstruct, solve_phema, std_to_exp


@pytest.mark.parametrize('gamma', [0.0, 0.5, 3.0, 6.93720394, 16.97219860, 97.0])
def test_width_is_the_profiles_relative_std(gamma):
    """sigma_rel from the moments of p(tau) = (g+1) tau^g on [0, 1], computed independently, and the inverse."""
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    assert exp_to_std(gamma) == pytest.approx(math.sqrt(second - mean ** 2), rel=1e-12)
    assert std_to_exp(exp_to_std(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_edm2_reference_widths_and_bad_widths():
    assert std_to_exp(0.05) == pytest.approx(16.97219860, abs=1e-7)
    assert std_to_exp(0.10) == pytest.approx(6.93720394, abs=1e-7)
    for bad in (0.0, -0.1, 0.3, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='sigma_rel must be in'):
            std_to_exp(bad)
    for bad in (-1.0, -2.0, float('nan')):
        with pytest.raises(ValueError, match='gamma must be'):
            exp_to_std(bad)


def test_update_weights_are_the_profile_mass_per_step():
    """One-hot 'parameters' read off each step's weight: (k/K)^(g+1) - ((k-1)/K)^(g+1); the start has none."""
    K = 37
    ema = PowerEMA({'w': torch.full((K,), 5.0, dtype=torch.float64)}, sigma_rels=(0.05, 0.2))
    for k in range(K): ema.update({'w': torch.eye(K, dtype=torch.float64)[k]})
    k = torch.arange(1, K + 1, dtype=torch.float64)
    for average, g in zip(ema.averages, ema.gammas):
        expected = (k / K) ** (g + 1) - ((k - 1) / K) ** (g + 1)
        assert torch.allclose(average['w'], expected, rtol=0, atol=1e-13)
    assert power_ema_beta(1, 7.0) == 0 and ema.t == K
    with pytest.raises(ValueError, match='step t must be >= 1'):
        power_ema_beta(0, 1.0)


def test_resumed_tracking_is_exact():
    """The step count and the averages are the whole state: restart from them, continue, get the same."""
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(20)]
    full = PowerEMA({'w': thetas[0]})
    for th in thetas: full.update({'w': th})
    first = PowerEMA({'w': thetas[0]})
    for th in thetas[:11]: first.update({'w': th})
    resumed = PowerEMA({'w': thetas[0]}, t=first.t)
    resumed.averages = [{k: v.clone() for k, v in a.items()} for a in first.averages]
    for th in thetas[11:]: resumed.update({'w': th})
    assert all(torch.equal(a['w'], b['w']) for a, b in zip(full.averages, resumed.averages))


def test_inner_product_closed_form():
    """Against direct integration of the two profiles (midpoint rule, fine grid), symmetric, degree -1."""
    ga, gb = std_to_exp(0.05), std_to_exp(0.12)
    for ta, tb in ((3.0, 5.0), (5.0, 3.0), (4.0, 4.0)):
        n = 400_000
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * min(ta, tb) / n
        numeric = ((ga + 1) * (tau / ta) ** ga / ta * (gb + 1) * (tau / tb) ** gb / tb).sum().item() * min(ta, tb) / n
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-6)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(profile_inner(tb, gb, ta, ga), rel=1e-14)
        assert profile_inner(7 * ta, ga, 7 * tb, gb) * 7 == pytest.approx(profile_inner(ta, ga, tb, gb), rel=1e-12)
    assert profile_inner(1e6, 97.0, 2e6, 97.0) > 0  # large times and exponents: no overflow
    with pytest.raises(ValueError, match='times must be > 0'):
        profile_inner(0.0, 1.0, 1.0, 1.0)


def test_reconstruction_selects_stored_profiles_and_keeps_constants():
    times = [10.0 * i for i in range(1, 9)]
    t_in, s_in = times * 2, [0.05] * 8 + [0.10] * 8
    for target, j in ((0.05, 7), (0.10, 15)):
        x = solve_phema(t_in, s_in, 80.0, target)
        assert x[j] == pytest.approx(1, abs=1e-9) and np.abs(np.delete(x, j)).max() < 1e-9
    snaps = [(t, s, {'a': torch.full((3,), 2.5)}) for t, s in zip(t_in, s_in)]
    out = reconstruct(snaps + [(90.0, 0.05, {'a': torch.zeros(3)})], 80.0, 0.13)  # later snapshots are not used
    assert torch.allclose(out['a'], torch.full((3,), 2.5, dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match='no snapshot'):
        reconstruct(snaps, 5.0, 0.1)
