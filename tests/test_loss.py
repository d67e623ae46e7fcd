"""edm_lit.loss (chapter 6): loss weights, p_train, the F-space identity, and a short training run on toy data."""
import math

import pytest
import torch

from edm_lit.loss import EDMLoss, VELoss, VPLoss, edm_loss_weight, eps_loss_weight
from edm_lit.precond import EDMPrecond, edm_coefficients, effective_target, ve_coefficients, vp_coefficients
from edm_lit.schedules import vp_sigma_inv
from edm_lit.toy import GaussianMixture, ToyMLP, denoising_error, ring_mixture, train_toy

F64 = torch.float64


def test_effective_weight_is_one():
    """lambda(sigma) c_out(sigma)^2 = 1 for VP, VE and EDM (Table 1)."""
    sigma = torch.logspace(-3, 3, 61, dtype=F64)
    for weight, c_out in ((VPLoss().weight(sigma), vp_coefficients(sigma)[1]),
                          (VELoss().weight(sigma), ve_coefficients(sigma)[1]),
                          (EDMLoss(sigma_data=0.3).weight(sigma), edm_coefficients(sigma, 0.3)[1])):
        assert torch.allclose(weight * c_out ** 2, torch.ones_like(sigma), rtol=1e-13, atol=0)


def test_weights_by_hand():
    assert abs(edm_loss_weight(0.5, 0.5) - 8.0) < 1e-15          # (1/4 + 1/4) / (1/4)^2
    assert abs(edm_loss_weight(2.0, 0.5) - 4.25 / 1.0) < 1e-15   # (4 + 1/4) / (2 * 1/2)^2
    assert abs(eps_loss_weight(0.1) - 100.0) < 1e-12


def test_p_train_moments():
    g = torch.Generator().manual_seed(0)
    log_sigma = EDMLoss(P_mean=-0.4, P_std=0.8).sample_sigma((400_000, 1), generator=g).double().log()
    assert abs(log_sigma.mean() + 0.4) < 0.005 and abs(log_sigma.std() - 0.8) < 0.005
    log_sigma = VELoss().sample_sigma((400_000, 1), generator=g).double().log()
    lo, hi = math.log(0.02), math.log(100)
    assert abs(log_sigma.mean() - (lo + hi) / 2) < 0.01 and abs(log_sigma.var() - (hi - lo) ** 2 / 12) < 0.02
    assert lo - 1e-6 <= log_sigma.min() and log_sigma.max() <= hi + 1e-6
    t = vp_sigma_inv(VPLoss().sample_sigma((400_000, 1), generator=g))
    assert abs(t.mean() - (1 + 1e-5) / 2) < 0.002 and abs(t.var() - (1 - 1e-5) ** 2 / 12) < 0.001
    assert t.min() >= 1e-5 * (1 - 1e-9) and t.max() <= 1


def test_loss_is_the_F_space_mse():
    """Eq. 8: lambda |D - y|^2 = |F(c_in (y + n); c_noise) - F_target|^2, element by element."""
    torch.manual_seed(0)
    net = EDMPrecond(ToyMLP(dim=3), sigma_data=0.7)
    loss_fn = EDMLoss(sigma_data=0.7)
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    loss = loss_fn(net, y, generator=torch.Generator().manual_seed(2)).detach()
    g = torch.Generator().manual_seed(2)  # replay: sigma first, then n
    sigma = loss_fn.sample_sigma((16, 1), generator=g)
    n = torch.randn(y.shape, generator=g) * sigma
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.7)
    with torch.no_grad(): F_x = net.model(c_in * (y + n), c_noise.flatten())
    assert loss.shape == y.shape
    assert torch.allclose(loss, (F_x - effective_target(y, n, c_skip, c_out)) ** 2, rtol=1e-4, atol=1e-6)


def test_ideal_gaussian_denoiser_has_unit_loss():
    """For data N(0, s_d^2 I) the ideal denoiser's EDM-weighted loss is exactly 1 per element at every sigma."""
    s_d = 0.5
    ideal = GaussianMixture(torch.ones(1), torch.zeros(1, 4), torch.full((1,), s_d))
    images = ideal.sample(100_000, generator=torch.Generator().manual_seed(3))
    loss = EDMLoss(sigma_data=s_d)(ideal, images, generator=torch.Generator().manual_seed(4))
    assert abs(loss.mean().item() - 1) < 0.01
    loss = VELoss()(ideal, images, generator=torch.Generator().manual_seed(5))  # 1/sigma^2 weight: s_d^2/(s^2+s_d^2)
    sigma = VELoss().sample_sigma((100_000, 1), generator=torch.Generator().manual_seed(5)).double()
    assert abs(loss.mean().item() - (s_d ** 2 / (sigma ** 2 + s_d ** 2)).mean().item()) < 0.01


def test_image_batches_and_augment_pipe():
    """sigma is one value per image; the augment pipe's images are the targets and its labels reach the net."""
    seen = {}

    def net(x, sigma, labels=None, augment_labels=None):
        seen.update(sigma=sigma, labels=labels, augment_labels=augment_labels)
        return torch.zeros_like(x)

    images = torch.ones(5, 1, 4, 4)
    augment = lambda im: (-2 * im, torch.arange(5.0)[:, None])
    loss = VPLoss()(net, images, labels=torch.eye(5), augment_pipe=augment)
    assert seen['sigma'].shape == (5, 1, 1, 1) and torch.equal(seen['augment_labels'], torch.arange(5.0)[:, None])
    assert torch.allclose(loss, (4 / seen['sigma'] ** 2).expand_as(loss))  # D = 0, y = -2: lambda * 4
    VELoss()(net, images)
    assert seen['augment_labels'] is None and seen['labels'] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match='P_std must be > 0'): EDMLoss(P_std=0)
    with pytest.raises(ValueError, match='sigma_data must be > 0'): EDMLoss(sigma_data=-1)
    with pytest.raises(ValueError, match='sigma_max must exceed'): VELoss(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match='epsilon_t must be > 0'): VPLoss(epsilon_t=0)
    with pytest.raises(ValueError, match='labels hold 3 rows for a batch of 2'):
        EDMLoss()(lambda x, s, l: x, torch.zeros(2, 2), labels=torch.zeros(3, 1))
    with pytest.raises(ValueError, match='sigma must be > 0'): edm_loss_weight(0.0)


def test_training_approaches_the_ideal_denoiser():
    """A small MLP in EDMPrecond, trained with EDMLoss on a ring mixture, moves towards the exact denoiser."""
    mixture = ring_mixture(num_components=8, radius=0.7, std=0.05)
    sigma_data = mixture.cov.diagonal().mean().sqrt().item()
    torch.manual_seed(0)
    net = EDMPrecond(ToyMLP(), sigma_data=sigma_data)
    loss_fn = EDMLoss(sigma_data=sigma_data)
    y = mixture.sample(2000, generator=torch.Generator().manual_seed(1))

    def distance():
        return sum(loss_fn.weight(s) * denoising_error(net, y, s, mixture, torch.Generator().manual_seed(2))
                   for s in (0.05, 0.1, 0.2, 0.5, 1.0)).item()

    before = distance()
    losses = train_toy(net, loss_fn, mixture.sample, torch.optim.Adam(net.parameters(), lr=1e-2), 1000,
                       batch_size=512, generator=torch.Generator().manual_seed(3))
    assert len(losses) == 1000 and all(math.isfinite(v) for v in losses)
    assert distance() < before / 3
