"""edm_lit.precond (chapter 5): the four columns of Table 1 against closed forms, limits and identities."""
import math

import pytest
import torch

from edm_lit.precond import (EDMPrecond, VEPrecond, VPPrecond, edm_coefficients, effective_target, eps_coefficients,
                             iDDPMPrecond, iddpm_coefficients, per_sample, ve_coefficients, vp_coefficients)
from edm_lit.schedules import iddpm_u
from edm_lit.toy import GaussianMixture

F64 = torch.float64


class Recorder(torch.nn.Module):
    """A stand-in F: returns its input times `gain` (repeated `repeat` times along dim 1) and records its arguments."""
    def __init__(self, gain=1.0, repeat=1):
        super().__init__()
        self.gain, self.repeat, self.calls = gain, repeat, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, augment_labels=augment_labels))
        return torch.cat([x * self.gain] * self.repeat, dim=1)


@pytest.mark.parametrize('sigma', [0.002, 0.1, 0.5, 3.0, 80.0])
def test_edm_unit_input_and_target_variance(sigma):
    """App. B.6: Var[c_in (y + n)] = 1 and Var[F_target] = 1 for any data of std sigma_data (here: uniform)."""
    sigma_data, N = 0.5, 400_000
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(N, generator=g, dtype=F64) * 2 - 1) * sigma_data * math.sqrt(3)  # U(-a, a) has std a/sqrt(3)
    n = torch.randn(N, generator=g, dtype=F64) * sigma
    c_skip, c_out, c_in, _ = edm_coefficients(sigma, sigma_data)
    assert abs((c_in * (y + n)).var().item() - 1) < 0.015
    assert abs(effective_target(y, n, c_skip, c_out).var().item() - 1) < 0.015


def test_edm_limits():
    c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor([1e-9, 1e9], dtype=F64), 0.5)
    assert abs(c_skip[0] - 1) < 1e-15 and abs(c_out[0] / 1e-9 - 1) < 1e-12   # sigma -> 0: D = x
    assert c_skip[1] < 1e-18 and abs(c_out[1] - 0.5) < 1e-15                  # sigma -> inf: c_out -> sigma_data
    assert abs(c_in[1] * 1e9 - 1) < 1e-12 and abs(c_in[0] - 2) < 1e-15        # c_in -> 1/sigma, 1/sigma_data


@pytest.mark.parametrize('sigma', [0.01, 0.2, 0.5, 2.0, 50.0])
def test_edm_c_skip_minimises_c_out(sigma):
    """Among c_skip with unit target variance, c_out^2 = (1 - c_skip)^2 s_d^2 + c_skip^2 sigma^2 is smallest at EDM's."""
    sigma_data = 0.5
    c_skip_grid = torch.linspace(0, 1, 200_001, dtype=F64)
    c_out_allowed = ((1 - c_skip_grid) ** 2 * sigma_data ** 2 + c_skip_grid ** 2 * sigma ** 2).sqrt()
    c_skip, c_out, _, _ = edm_coefficients(sigma, sigma_data)
    assert abs(c_skip_grid[c_out_allowed.argmin()] - c_skip) <= 5e-6
    assert abs(c_out_allowed.min() - c_out) < 1e-10
    assert (c_out_allowed >= c_out - 1e-15).all()


def test_edm_exact_values():
    """Table 1, EDM: at sigma = sigma_data, c_skip = 1/2, c_out = s_d/sqrt 2, c_in = 1/(s_d sqrt 2); c_noise = ln(s)/4."""
    for sigma_data in (0.5, 1.3):
        got = torch.stack(edm_coefficients(sigma_data, sigma_data))
        want = torch.tensor([0.5, sigma_data / math.sqrt(2), 1 / (sigma_data * math.sqrt(2)), math.log(sigma_data) / 4],
                            dtype=F64)
        assert torch.allclose(got, want, rtol=1e-15, atol=0)
    c_skip, c_out, c_in, c_noise = edm_coefficients(3.0, 0.5)  # sigma = 3, s_d = 1/2: sigma^2 + s_d^2 = 37/4
    assert abs(c_skip - 1 / 37) < 1e-16 and abs(c_out - 3 / math.sqrt(37)) < 1e-15
    assert abs(c_in - 2 / math.sqrt(37)) < 1e-15 and abs(c_noise - math.log(3) / 4) < 1e-15


def test_gaussian_ideal_denoiser_is_the_skip_path():
    """For data N(0, s_d^2 I) the ideal denoiser is c_skip(sigma) x: the ideal F of EDM is zero."""
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 3), torch.full((1,), 0.5))
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    for sigma in (0.003, 0.5, 40.0):
        assert torch.allclose(gaussian.denoiser(x, sigma), edm_coefficients(sigma, 0.5)[0] * x, rtol=1e-13, atol=1e-15)


def test_vp_coefficients_by_hand():
    """Table 1, VP: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(1 + sigma^2), c_noise = (M - 1) sigma^-1(sigma)."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = vp_coefficients(sigma)
    assert torch.equal(c_skip, torch.ones_like(sigma)) and torch.equal(c_out, -sigma)
    assert torch.allclose(c_in, 1 / (1 + sigma ** 2).sqrt(), rtol=1e-15, atol=0)
    t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(2)) - 0.1) / 19.9  # sigma^-1(1) solved by hand
    assert abs(c_noise[2] - 999 * t) < 1e-10
    t = c_noise / 999  # plugging t back into sigma(t) returns sigma
    assert torch.allclose(((0.5 * 19.9 * t ** 2 + 0.1 * t).exp() - 1).sqrt(), sigma, rtol=1e-10, atol=0)


def test_ve_coefficients_by_hand():
    c_skip, c_out, c_in, c_noise = ve_coefficients(torch.tensor([2.0, 0.02, 100.0], dtype=F64))
    assert c_noise.tolist() == [0.0, math.log(0.01), math.log(50.0)]
    assert c_out.tolist() == [2.0, 0.02, 100.0] and c_skip.tolist() == c_in.tolist() == [1.0, 1.0, 1.0]


def test_iddpm_noise_label_is_the_grid_index():
    """Table 1, iDDPM: c_noise = M - 1 - argmin_j |u_j - sigma|; the grid ends are sigma_max = u_0, sigma_min = u_{M-1}."""
    u = iddpm_u()
    _, _, _, c_noise = iddpm_coefficients(u[[0, 1, 8, 500, 998, 999]], u)
    assert c_noise.tolist() == [999.0, 998.0, 991.0, 499.0, 1.0, 0.0]
    mid = 0.5 * (u[700] + u[701])
    assert iddpm_coefficients(mid * (1 + 1e-9), u)[3] == 299 and iddpm_coefficients(mid * (1 - 1e-9), u)[3] == 298
    net = iDDPMPrecond(Recorder())
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # eq-ode-iddpm-closed
    assert abs(net.sigma_min - math.sqrt(alpha_bar(1000) / alpha_bar(999) - 1)) < 1e-12
    assert abs(net.sigma_max - math.sqrt((alpha_bar(1000) / alpha_bar(1)) / 0.001 - 1)) < 1e-6  # u_0: clipped at C_1
    assert net.round_sigma(mid * (1 + 1e-9)).item() == u[700] and net.round_sigma(mid * (1 - 1e-9)).item() == u[701]
    assert net.round_sigma(torch.tensor([u[3] * 1.01]), return_index=True).tolist() == [3]


def test_vp_and_ve_sigma_ranges():
    """VP: [sigma(eps_t), sigma(1)] with eps_t = 1e-5 (in float64); VE: [0.02, 100]; EDM: [0, inf)."""
    net = VPPrecond(Recorder())
    assert abs(net.sigma_min - math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5))) < 1e-15
    assert abs(net.sigma_max - math.sqrt(math.expm1(0.5 * 19.9 + 0.1))) < 1e-10
    ve, edm = VEPrecond(Recorder()), EDMPrecond(Recorder())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.0, math.inf, 0.5)
    assert torch.equal(edm.round_sigma(torch.tensor([0.3, 7.0])), torch.tensor([0.3, 7.0]))


@pytest.mark.parametrize('sigma', [0.7, torch.tensor(0.7), torch.full((4,), 0.7), torch.full((4, 1, 1, 1), 0.7)])
def test_forward_follows_eq7_for_any_sigma_shape(sigma):
    """With F(x_in) = x_in, D = (c_skip + c_out c_in) x = s_d (s_d + sigma) / (sigma^2 + s_d^2) x for EDM."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    D_x = EDMPrecond(Recorder())(x, sigma)
    assert D_x.dtype == torch.float32 and D_x.shape == x.shape
    assert torch.allclose(D_x, 0.5 * (0.5 + 0.7) / (0.49 + 0.25) * x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('make, coefficients', [(lambda m: VPPrecond(m), vp_coefficients),
                                                (lambda m: VEPrecond(m), ve_coefficients),
                                                (lambda m: EDMPrecond(m, sigma_data=0.7), lambda s: edm_coefficients(s, 0.7)),
                                                (lambda m: iDDPMPrecond(m), lambda s: iddpm_coefficients(s, iddpm_u()))])
def test_forward_passes_c_in_x_and_c_noise(make, coefficients):
    """The inner network receives c_in * x and c_noise per sample (official call); D = c_skip x + c_out F."""
    model = Recorder(gain=2.0)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=F64)
    D_x = make(model)(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1) for c in coefficients(sigma))
    call = model.calls[-1]
    assert torch.allclose(call['x'].double(), c_in * x, rtol=1e-6)
    assert torch.allclose(call['noise_labels'].double(), c_noise.flatten(), rtol=1e-5, atol=1e-5)
    assert call['noise_labels'].shape == (3,)
    assert torch.allclose(D_x.double(), c_skip * x + c_out * 2 * c_in * x, rtol=1e-5, atol=1e-6)


def test_labels_and_extra_channels():
    model = Recorder(repeat=2)  # iDDPM models also output a variance: 2C channels, D keeps the first C
    net = iDDPMPrecond(model, label_dim=3)
    x = torch.randn(2, 4)
    assert net(x, 1.0).shape == x.shape
    assert torch.equal(model.calls[-1]['class_labels'], torch.zeros(1, 3))  # conditional net, no labels: zeros
    net(x, 1.0, class_labels=torch.eye(3)[[0, 2]].double(), augment_labels=torch.ones(2, 9))
    assert model.calls[-1]['class_labels'].dtype == torch.float32 and model.calls[-1]['augment_labels'].shape == (2, 9)
    EDMPrecond(model)(x, 1.0, class_labels=torch.eye(3)[[0, 2]])
    assert model.calls[-1]['class_labels'] is None  # unconditional net: labels are not passed on (as official)


def test_integer_class_labels_become_one_hot_rows():
    """Classes given as integers of shape (N,) mean the same as their one-hot rows; anything else is refused."""
    model = Recorder()
    net = EDMPrecond(model, label_dim=10)
    x = torch.randn(20, 2)  # N = 20 = 2 * label_dim: reshaping (N,) to (-1, 10) would silently give 2 rows
    classes = torch.arange(20) % 10
    net(x, 1.0, class_labels=classes)
    assert torch.equal(model.calls[-1]['class_labels'], torch.eye(10)[classes])
    net(x, 1.0, class_labels=torch.nn.functional.one_hot(classes, 10))  # int64 one-hot rows (what one_hot returns)
    assert torch.equal(model.calls[-1]['class_labels'], torch.eye(10)[classes])
    net(x[:1], 1.0, class_labels=torch.tensor(7))
    assert torch.equal(model.calls[-1]['class_labels'], torch.eye(10)[[7]])
    with pytest.raises(ValueError, match='class label 10 is not in 0..9'): net(x, 1.0, class_labels=classes + 1)
    with pytest.raises(ValueError, match='class label -1 is not in 0..9'): net(x, 1.0, class_labels=classes - 1)
    with pytest.raises(ValueError, match=r'shape \(20, 3\) do not fit label_dim=10'):
        net(x, 1.0, class_labels=torch.zeros(20, 3))
    with pytest.raises(ValueError, match='3 rows of class labels for a batch of 20'):
        net(x, 1.0, class_labels=torch.eye(10)[:3])


def test_bad_inputs_raise_clear_errors():
    net = EDMPrecond(Recorder())
    with pytest.raises(ValueError, match='sigma must be > 0'): net(torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match='sigma must be > 0'): edm_coefficients(-1.0)
    with pytest.raises(ValueError, match='sigma must be > 0'): vp_coefficients(float('nan'))
    with pytest.raises(ValueError, match='3 values .* batch of 2'): net(torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match='sigma_data must be > 0'): EDMPrecond(Recorder(), sigma_data=0)
    with pytest.raises(ValueError, match='sigma_data must be > 0'): edm_coefficients(1.0, -0.5)
    with pytest.raises(ValueError, match='label_dim'): EDMPrecond(Recorder(), label_dim=-1)
    with pytest.raises(ValueError, match='at least 2 dims'): net(torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match='sigma_max must exceed'): VEPrecond(Recorder(), sigma_min=1, sigma_max=0.5)
    with pytest.raises(ValueError, match='beta_d must be > 0'): VPPrecond(Recorder(), beta_d=0)
    with pytest.raises(ValueError): per_sample(torch.ones(2, 2), torch.zeros(3, 1))


def test_eps_coefficients_predict_the_noise():
    """VP/iDDPM: D = x - sigma F; the effective target is n / sigma for any data (unit variance)."""
    sigma, y, n = 0.3, torch.tensor([1.7]), torch.tensor([0.03])
    c_skip, c_out, _ = eps_coefficients(torch.tensor(sigma))
    assert torch.allclose(effective_target(y, n, c_skip, c_out), n / sigma)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_device_follows_input():
    for net in (EDMPrecond(Recorder()), iDDPMPrecond(Recorder()), VPPrecond(Recorder())):
        net = net.cuda()
        D_x = net(torch.randn(3, 2, device='cuda'), torch.tensor([0.1, 1.0, 10.0], device='cuda'))
        assert D_x.device.type == 'cuda' and D_x.dtype == torch.float32
