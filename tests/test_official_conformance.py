"""Conformance with the paper's official code, NVlabs/edm at commit 008a4e5 (not the first commit: its VP range used
beta_d = 19.1, a typo fixed in the next one).

Every `official_*` function and constant below is a transcription, written for this file, of a formula of the
official sources; the comment on each names the file and the function it comes from. The transcriptions evaluate in
float64 and never call edm_lit, so every expected number is derived independently of the code under test.

Where the official code computes in float32 (VPPrecond, VPLoss, iDDPMPrecond, and the alpha_bar of generate.py's
iDDPM grid, whose index `j` is an int64 tensor) our library computes in float64; those float32 round-offs are the only
differences allowed, and the tests that document them say so. The npz files of ../shared/fixtures/official-edm
hold only network outputs (the weights are in pickles, which we do not load), so nothing here reads them.
"""
import inspect
import math

import numpy as np
import pytest
import torch

from edm_lit import loss as L
from edm_lit import precond as P
from edm_lit import samplers, schedules, stochastic
from edm_lit.toy import ring_mixture

F64 = torch.float64
INF = float('inf')

# ---------------------------------------------------------------------------------------------------------------------
# Official defaults, transcribed from the signatures at 008a4e5.

OFFICIAL_EDM_SAMPLER = dict(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=INF,
                            S_noise=1)                                             # generate.py, edm_sampler
OFFICIAL_ABLATION_SAMPLER = dict(num_steps=18, sigma_min=None, sigma_max=None, rho=7, solver='heun',
                                 discretization='edm', schedule='linear', scaling='none', epsilon_s=1e-3, C_1=0.001,
                                 C_2=0.008, M=1000, alpha=1, S_churn=0, S_min=0, S_max=INF,
                                 S_noise=1)                                        # generate.py, ablation_sampler
OFFICIAL_PRECOND = {                                                               # training/networks.py, *Precond
    'VPPrecond': dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    'VEPrecond': dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100),
    'iDDPMPrecond': dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000),
    'EDMPrecond': dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=INF, sigma_data=0.5)}
OFFICIAL_LOSS = {'VPLoss': dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5),       # training/loss.py
                 'VELoss': dict(sigma_min=0.02, sigma_max=100),
                 'EDMLoss': dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)}


def defaults(fn, names):
    """The default values of the parameters `names` in the signature of `fn` (a function or a class)."""
    params = inspect.signature(fn).parameters
    return {name: params[name].default for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Transcriptions: noise-level schedules (generate.py, ablation_sampler, "Helper functions for VP & VE").

def official_vp_sigma(beta_d, beta_min):
    """generate.py, ablation_sampler: vp_sigma."""
    return lambda t: (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


def official_vp_sigma_deriv(beta_d, beta_min):
    """generate.py, ablation_sampler: vp_sigma_deriv (it reads the sigma of the VP schedule)."""
    sigma = official_vp_sigma(beta_d, beta_min)
    return lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))


def official_vp_sigma_inv(beta_d, beta_min):
    """generate.py, ablation_sampler: vp_sigma_inv; also VPPrecond.sigma_inv of training/networks.py."""
    return lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d


def official_schedule(schedule, scaling, vp_beta_d, vp_beta_min):
    """generate.py, ablation_sampler: 'Define noise level schedule' and 'Define scaling schedule'."""
    if schedule == 'vp':
        sigma, sigma_deriv, sigma_inv = (f(vp_beta_d, vp_beta_min) for f in
                                         (official_vp_sigma, official_vp_sigma_deriv, official_vp_sigma_inv))
    elif schedule == 've':
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s ** 2)
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda s: s)
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    else:
        s, s_deriv = (lambda t: 1), (lambda t: 0)
    return sigma, sigma_deriv, sigma_inv, s, s_deriv


def official_default_range(discretization, epsilon_s=1e-3):
    """generate.py, ablation_sampler: 'Select default noise level range based on the ... discretization'."""
    vp = official_vp_sigma(beta_d=19.9, beta_min=0.1)
    sigma_min = {'vp': vp(epsilon_s), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    sigma_max = {'vp': vp(1), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    return sigma_min, sigma_max


def official_vp_betas(sigma_min, sigma_max, epsilon_s):
    """generate.py, ablation_sampler: 'Compute corresponding betas for VP'."""
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    return vp_beta_d, np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d


def official_iddpm_u(C_1=0.001, C_2=0.008, M=1000, dtype=F64):
    """The u_j recursion of generate.py ablation_sampler ('iddpm') and of iDDPMPrecond.__init__ (networks.py).

    dtype=float64 is the transcription used for comparisons. dtype=float32 reproduces the official arithmetic:
    iDDPMPrecond stores u in float32, and in generate.py alpha_bar(j) of an int64 tensor j is float32 too.
    """
    alpha_bar = lambda j: (0.5 * np.pi * torch.tensor(j, dtype=dtype) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=dtype)
    for j in range(M, 0, -1):  # M, ..., 1
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def official_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho=7, epsilon_s=1e-3, C_1=0.001,
                         C_2=0.008, M=1000):
    """generate.py, ablation_sampler: 'Define time steps in terms of noise level' (float64)."""
    step_indices = torch.arange(num_steps, dtype=F64)
    if discretization == 'vp':
        orig_t_steps = 1 + step_indices / (num_steps - 1) * (epsilon_s - 1)
        return official_vp_sigma(*official_vp_betas(sigma_min, sigma_max, epsilon_s))(orig_t_steps)
    if discretization == 've':
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (step_indices / (num_steps - 1)))
        return orig_t_steps.sqrt()
    if discretization == 'iddpm':
        u = official_iddpm_u(C_1, C_2, M)
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
            * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


# ---------------------------------------------------------------------------------------------------------------------
# Transcriptions: the samplers and the noise source of generate.py.

class OfficialStackedRandomGenerator:
    """generate.py, StackedRandomGenerator: one torch.Generator per sample, seeded with seed % 2**32."""
    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def official_edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                         sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=INF, S_noise=1):
    """generate.py, edm_sampler (Algorithm 2)."""
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=F64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(F64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(F64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(F64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def official_ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                              sigma_min=None, sigma_max=None, rho=7, solver='heun', discretization='edm',
                              schedule='linear', scaling='none', epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000,
                              alpha=1, S_churn=0, S_min=0, S_max=INF, S_noise=1):
    """generate.py, ablation_sampler (float64; the iDDPM grid through official_iddpm_u in float64)."""
    default_min, default_max = official_default_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(default_max if sigma_max is None else sigma_max, net.sigma_max)
    vp_beta_d, vp_beta_min = official_vp_betas(sigma_min, sigma_max, epsilon_s)
    sigma_steps = official_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M)
    sigma, sigma_deriv, sigma_inv, s, s_deriv = official_schedule(schedule, scaling, vp_beta_d, vp_beta_min)
    t_steps = sigma_inv(net.round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    dxdt = lambda x, t, D: (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * D
    x_next = latents.to(F64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() \
            * s(t_hat) * S_noise * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = dxdt(x_hat, t_hat, net(x_hat / s(t_hat), sigma(t_hat), class_labels).to(F64))
        x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            d_prime = dxdt(x_prime, t_prime, net(x_prime / s(t_prime), sigma(t_prime), class_labels).to(F64))
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


# ---------------------------------------------------------------------------------------------------------------------
# Transcriptions: preconditioning (training/networks.py, the four *Precond classes).

def official_vp_precond_sigma(t, beta_d=19.9, beta_min=0.1):
    """training/networks.py, VPPrecond.sigma (torch.as_tensor(t): a Python float becomes float32 there)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def official_coefficients(name, sigma, beta_d=19.9, beta_min=0.1, M=1000, u=None, sigma_data=0.5):
    """training/networks.py, <name>.forward: (c_skip, c_out, c_in, c_noise) at sigma, in sigma's dtype."""
    if name == 'VPPrecond':
        c_noise = (M - 1) * official_vp_sigma_inv(beta_d, beta_min)(sigma)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise
    if name == 'VEPrecond':
        return 1, sigma, 1, (0.5 * sigma).log()
    if name == 'iDDPMPrecond':
        index = official_iddpm_round_sigma(sigma, u, return_index=True)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), len(u) - 2 - index.to(sigma.dtype)  # M - 1 - j
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, 1 / (sigma_data ** 2 + sigma ** 2).sqrt(), sigma.log() / 4


def official_iddpm_round_sigma(sigma, u, return_index=False):
    """training/networks.py, iDDPMPrecond.round_sigma (the distances in u's dtype, as there in float32)."""
    sigma = torch.as_tensor(sigma)
    index = torch.cdist(sigma.to(u.dtype).reshape(1, -1, 1), u.reshape(1, -1, 1)).argmin(2)
    result = index if return_index else u[index.flatten()].to(sigma.dtype)
    return result.reshape(sigma.shape)


def official_precond_forward(name, model, x, sigma, class_labels=None, label_dim=0, u=None, **model_kwargs):
    """training/networks.py, <name>.forward on the CPU (float32 throughout, as there)."""
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    class_labels = None if label_dim == 0 else torch.zeros([1, label_dim]) if class_labels is None \
        else class_labels.to(torch.float32).reshape(-1, label_dim)
    c_skip, c_out, c_in, c_noise = official_coefficients(name, sigma, u=u)
    F_x = model((c_in * x).to(torch.float32), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
    return c_skip * x + c_out * F_x[:, :x.shape[1]].to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Transcriptions: the losses (training/loss.py), on torch's global generator as there.

def official_vp_sigma_of_t(t, beta_d=19.9, beta_min=0.1):
    """training/loss.py, VPLoss.sigma."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def official_loss_body(net, images, labels, augment_pipe, sigma, weight):
    """training/loss.py, the lines after 'weight = ...' shared by VPLoss, VELoss and EDMLoss."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


def official_vp_loss(net, images, labels=None, augment_pipe=None, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5,
                     uniform_dtype=torch.float32):
    """training/loss.py, VPLoss.__call__; uniform_dtype=float64 replays our draw (σ then cast to the images' dtype)."""
    rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], dtype=uniform_dtype)
    sigma = official_vp_sigma_of_t(1 + rnd_uniform * (epsilon_t - 1), beta_d, beta_min).to(images.dtype)
    return official_loss_body(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)


def official_ve_loss(net, images, labels=None, augment_pipe=None, sigma_min=0.02, sigma_max=100):
    """training/loss.py, VELoss.__call__."""
    rnd_uniform = torch.rand([images.shape[0], 1, 1, 1])
    sigma = sigma_min * ((sigma_max / sigma_min) ** rnd_uniform)
    return official_loss_body(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)


def official_edm_loss(net, images, labels=None, augment_pipe=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """training/loss.py, EDMLoss.__call__."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1])
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    return official_loss_body(net, images, labels, augment_pipe, sigma, weight)


# ---------------------------------------------------------------------------------------------------------------------
# Toy denoisers with closed forms (the ideal denoiser of chapter 1), usable by both the official and our samplers.

class GaussianDenoiser:
    """D(x; σ) = s²/(s² + σ²)·x, the ideal denoiser of N(0, s² I), in float64; optionally snaps σ to a grid."""
    def __init__(self, s=0.5, sigma_min=0.0, sigma_max=INF, grid=None):
        self.s, self.sigma_min, self.sigma_max, self.grid = s, sigma_min, sigma_max, grid

    def round_sigma(self, sigma):
        if self.grid is None: return torch.as_tensor(sigma)
        return official_iddpm_round_sigma(sigma, self.grid)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, *[1] * (x.ndim - 1))
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x.to(F64)


U64 = official_iddpm_u()
NETS = {'gauss': GaussianDenoiser(),
        'range': GaussianDenoiser(0.7, sigma_min=0.05, sigma_max=20.0),
        'iddpm-grid': GaussianDenoiser(0.5, sigma_min=float(U64[999]), sigma_max=float(U64[0]), grid=U64),
        'mixture': ring_mixture(num_components=4, radius=0.6, std=0.1)}
SEEDS = [3, 2 ** 32 + 7, 12_345_678_901]  # the last two only coincide with 7 and 12345678901 % 2**32 modulo 2**32


def latents_for(net_name):
    """Latents drawn as generate.py draws them: rnd.randn([batch, ...]) in float32."""
    shape = [len(SEEDS), 2] if net_name == 'mixture' else [len(SEEDS), 2, 2, 2]
    return OfficialStackedRandomGenerator('cpu', SEEDS).randn(shape)


def run_both(ours, official, net_name, **kwargs):
    """Both samplers on the same latents and per-sample noise seeds; returns (ours, official) in float64."""
    net, latents = NETS[net_name], latents_for(net_name)
    x_ours = ours(net, latents, randn_like=stochastic.StackedRandomGenerator('cpu', SEEDS).randn_like, **kwargs)
    x_official = official(net, latents, randn_like=OfficialStackedRandomGenerator('cpu', SEEDS).randn_like, **kwargs)
    return x_ours, x_official


def assert_same_samples(x_ours, x_official, rtol=1e-9):
    assert x_ours.dtype == F64 and x_ours.shape == x_official.shape
    assert torch.isfinite(x_official).all()
    error = (x_ours - x_official).abs().max().item()
    assert error <= rtol * x_official.abs().max().item(), f'max |ours - official| = {error:.3g}'


# =====================================================================================================================
# Defaults

def test_sampler_defaults_are_official():
    assert defaults(stochastic.edm_sampler, OFFICIAL_EDM_SAMPLER) == OFFICIAL_EDM_SAMPLER
    deterministic = {k: v for k, v in OFFICIAL_ABLATION_SAMPLER.items() if not k.startswith('S_')}
    assert defaults(samplers.ablation_sampler, deterministic) == deterministic
    assert defaults(stochastic.ablation_sampler, OFFICIAL_ABLATION_SAMPLER) == OFFICIAL_ABLATION_SAMPLER


@pytest.mark.parametrize('name', OFFICIAL_PRECOND)
def test_precond_defaults_are_official(name):
    cls, expected = getattr(P, name), OFFICIAL_PRECOND[name]
    assert defaults(cls, expected) == expected
    net = cls(torch.nn.Identity())
    for key, value in expected.items():
        if key not in ('label_dim', 'use_fp16', 'sigma_min', 'sigma_max'): assert getattr(net, key) == value, key


@pytest.mark.parametrize('name', OFFICIAL_LOSS)
def test_loss_defaults_are_official(name):
    cls, expected = getattr(L, name), OFFICIAL_LOSS[name]
    assert defaults(cls, expected) == expected
    loss_fn = cls()
    assert {key: getattr(loss_fn, key) for key in expected} == expected


# =====================================================================================================================
# Schedules (Table 1, rows "schedule" and "scaling"; generate.py ablation_sampler)

T = torch.cat([torch.logspace(-3, 0, 40, dtype=F64), torch.tensor([0.37, 1.0], dtype=F64)])


@pytest.mark.parametrize('betas', [(19.9, 0.1), (12.3, 0.4), official_vp_betas(0.002, 80, 1e-3)])
def test_vp_sigma_deriv_inv_are_official(betas):
    sigma = official_vp_sigma(*betas)(T)
    torch.testing.assert_close(schedules.vp_sigma(T, *betas), sigma, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedules.vp_sigma_deriv(T, *betas), official_vp_sigma_deriv(*betas)(T),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(schedules.vp_sigma_inv(sigma, *betas), official_vp_sigma_inv(*betas)(sigma),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize('schedule', ['vp', 've', 'linear'])
@pytest.mark.parametrize('scaling', ['vp', 'none'])
def test_schedule_and_scaling_are_official(schedule, scaling):
    betas = official_vp_betas(0.002, 80, 1e-3)
    ours = schedules.make_schedule(schedule, scaling, *betas)
    official = official_schedule(schedule, scaling, *betas)
    sigma = official[0](T)
    for name, f, g, arg in [('sigma', ours.sigma, official[0], T), ('sigma_deriv', ours.sigma_deriv, official[1], T),
                            ('sigma_inv', ours.sigma_inv, official[2], sigma), ('s', ours.s, official[3], T),
                            ('s_deriv', ours.s_deriv, official[4], T)]:
        expected = torch.as_tensor(g(arg), dtype=F64).expand_as(arg)
        torch.testing.assert_close(f(arg), expected, rtol=1e-10, atol=1e-300, msg=name)


def test_default_sigma_ranges_are_official():
    for discretization in ['vp', 've', 'iddpm', 'edm']:
        expected = official_default_range(discretization)
        assert schedules.DEFAULT_SIGMA_RANGE[discretization] == pytest.approx(expected, rel=1e-12), discretization
    assert schedules.DEFAULT_SIGMA_RANGE['vp'][1] == pytest.approx(152.17, abs=0.005)  # σ_VP(1) at β_d = 19.9
    assert official_vp_betas(*official_default_range('vp'), 1e-3) == pytest.approx((19.9, 0.1), rel=1e-9)


@pytest.mark.parametrize('epsilon_s', [1e-3, 1e-2, 0.05])
@pytest.mark.parametrize('discretization', ['vp', 've', 'iddpm', 'edm'])
def test_default_sigma_range_follows_epsilon_s(discretization, epsilon_s):
    expected = official_default_range(discretization, epsilon_s)
    assert schedules.default_sigma_range(discretization, epsilon_s) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('sigma_min,sigma_max,epsilon_s', [(0.002, 80, 1e-3), (0.02, 100, 1e-2), (0.01, 50, 5e-3),
                                                           (*official_default_range('vp'), 1e-3)])
def test_vp_betas_solve_is_official(sigma_min, sigma_max, epsilon_s):
    assert schedules.vp_betas(sigma_min, sigma_max, epsilon_s) == pytest.approx(
        official_vp_betas(sigma_min, sigma_max, epsilon_s), rel=1e-12)


DISCRETIZATION_CASES = [('vp', {}), ('vp', dict(epsilon_s=1e-2)), ('ve', {}), ('iddpm', {}),
                        ('iddpm', dict(C_1=0.002, C_2=0.01, M=500)), ('edm', {}), ('edm', dict(rho=3))]


@pytest.mark.parametrize('num_steps', [2, 5, 18])
@pytest.mark.parametrize('discretization,kwargs', DISCRETIZATION_CASES)
def test_time_step_discretizations_are_official(discretization, kwargs, num_steps):
    sigma_min, sigma_max = official_default_range(discretization, kwargs.get('epsilon_s', 1e-3))
    expected = official_sigma_steps(discretization, num_steps, sigma_min, sigma_max, **kwargs)
    got = schedules.sigma_steps(discretization, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=0)


def test_iddpm_grid_is_official():
    """u_j: equal to the float64 recursion; the official float32 arithmetic moves u_999 by about 5e-4 (relative)."""
    torch.testing.assert_close(schedules.iddpm_u(), U64, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedules.iddpm_u(0.002, 0.01, 500), official_iddpm_u(0.002, 0.01, 500),
                               rtol=1e-12, atol=0)
    u32 = official_iddpm_u(dtype=torch.float32).to(F64)  # iDDPMPrecond.__init__ exactly as written
    relative = ((u32 - U64) / U64)[:-1].abs()
    assert 1e-5 < relative.max() < 1e-3 and relative[:100].max() < 1e-5  # round-off builds up towards u_999


# =====================================================================================================================
# Preconditioning (Table 1, rows c_skip, c_out, c_in, c_noise; training/networks.py)

SIGMA = torch.cat([torch.logspace(-3, 4, 57, dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)])
OURS_COEFFICIENTS = {'VPPrecond': P.vp_coefficients, 'VEPrecond': P.ve_coefficients, 'EDMPrecond': P.edm_coefficients}


def assert_coefficients(ours, official, rtol):
    for name, got, expected in zip(['c_skip', 'c_out', 'c_in', 'c_noise'], ours, official):
        expected = torch.as_tensor(expected, dtype=F64).expand_as(got)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0, msg=name)


@pytest.mark.parametrize('name,kwargs', [('VPPrecond', {}), ('VPPrecond', dict(beta_d=10.0, beta_min=0.5, M=500)),
                                         ('VEPrecond', {}), ('EDMPrecond', {}), ('EDMPrecond', dict(sigma_data=0.3))])
def test_coefficients_are_official(name, kwargs):
    """The pure functions of σ against the official forward's formulas, both in float64."""
    assert_coefficients(OURS_COEFFICIENTS[name](SIGMA, **kwargs), official_coefficients(name, SIGMA, **kwargs),
                        rtol=1e-9)


def test_iddpm_coefficients_and_round_sigma_are_official():
    """c_noise = M - 1 - j and round_sigma at, near and on either side of the midpoints between grid values u_j."""
    j = torch.tensor([0, 1, 8, 250, 500, 998, 999])
    mid = 0.5 * (U64[j] + U64[j + 1])
    sigma = torch.cat([U64[j], U64[j] * (1 + 1e-6), mid * (1 + 1e-7), mid * (1 - 1e-7), torch.tensor([1e-4, 1e5])])
    assert_coefficients(P.iddpm_coefficients(sigma, schedules.iddpm_u()),
                        official_coefficients('iDDPMPrecond', sigma, u=U64), rtol=1e-12)
    net = P.iDDPMPrecond(torch.nn.Identity())
    assert torch.equal(net.round_sigma(sigma, return_index=True), official_iddpm_round_sigma(sigma, U64, True))
    torch.testing.assert_close(net.round_sigma(sigma), official_iddpm_round_sigma(sigma, U64), rtol=1e-12, atol=0)
    grid = sigma[:12].reshape(3, 4).to(torch.float32)  # shape and dtype are kept
    torch.testing.assert_close(net.round_sigma(grid), official_iddpm_round_sigma(grid, U64), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['VPPrecond', 'VEPrecond', 'EDMPrecond'])
def test_round_sigma_is_identity(name):
    net = getattr(P, name)(torch.nn.Identity())
    assert torch.equal(net.round_sigma(SIGMA), SIGMA)


def test_precond_sigma_ranges_are_official():
    vp = P.VPPrecond(torch.nn.Identity())
    sigma = lambda t, **kw: float(official_vp_precond_sigma(torch.tensor(t, dtype=F64), **kw))  # float64 evaluation
    assert (vp.sigma_min, vp.sigma_max) == pytest.approx((sigma(1e-5), sigma(1.0)), rel=1e-9)
    vp = P.VPPrecond(torch.nn.Identity(), beta_d=10.0, beta_min=0.5, epsilon_t=1e-3)
    assert (vp.sigma_min, vp.sigma_max) == pytest.approx((sigma(1e-3, beta_d=10.0, beta_min=0.5),
                                                          sigma(1.0, beta_d=10.0, beta_min=0.5)), rel=1e-9)
    assert (P.VEPrecond(None).sigma_min, P.VEPrecond(None).sigma_max) == (0.02, 100)
    assert (P.EDMPrecond(None).sigma_min, P.EDMPrecond(None).sigma_max, P.EDMPrecond(None).sigma_data) == (0, INF, 0.5)
    iddpm = P.iDDPMPrecond(None)
    assert (iddpm.sigma_min, iddpm.sigma_max) == pytest.approx((float(U64[999]), float(U64[0])), rel=1e-12)


def test_official_float32_vp_sigma_min_is_roundoff():
    """VPPrecond.sigma(1e-5) as written evaluates in float32: exp(1.0e-6) − 1 keeps ~1 significant bit of 7.

    The official sigma_min is 0.0009765625 = 2**-10, ours 0.00100050 (float64). Their squares differ by less than
    the float32 rounding error of exp near 1 (one ulp of 1.0 = 2**-23): round-off, not a different formula.
    """
    sigma32, sigma64 = float(official_vp_precond_sigma(1e-5)), P.VPPrecond(None).sigma_min
    assert sigma32 == 2.0 ** -10
    assert 0.01 < abs(sigma32 / sigma64 - 1) < 0.05 and abs(sigma32 ** 2 - sigma64 ** 2) <= 2.0 ** -23


class Recorder(torch.nn.Module):
    """A stand-in F_θ with a smooth output that depends on x_in and c_noise; records what it was given."""
    def __init__(self, repeat=1):
        super().__init__()
        self.repeat, self.calls = repeat, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append((x, noise_labels, class_labels))
        out = torch.tanh(x) + 0.01 * noise_labels.reshape(-1, *[1] * (x.ndim - 1))
        return torch.cat([out] * self.repeat, dim=1)


@pytest.mark.parametrize('name', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
@pytest.mark.parametrize('label_dim,labels', [(0, None), (10, None), (10, 'onehot')])
def test_precond_forward_is_official_in_float32(name, label_dim, labels):
    """D_x, F's input, noise label and class labels of a whole forward pass, both sides in float32 as officially."""
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.2, 1.3, 40.0])
    class_labels = None if labels is None else torch.eye(label_dim)[[1, 4, 7]]
    repeat = 2 if name == 'iDDPMPrecond' else 1  # iDDPM's network has 2C output channels; D uses the first C
    ours_F, official_F = Recorder(repeat), Recorder(repeat)
    D_ours = getattr(P, name)(ours_F, label_dim=label_dim)(x, sigma, class_labels)
    D_official = official_precond_forward(name, official_F, x, sigma, class_labels, label_dim,
                                          u=official_iddpm_u(dtype=torch.float32))
    torch.testing.assert_close(D_ours, D_official, rtol=1e-5, atol=1e-6)
    (x_in, c_noise, labels_ours), (x_in_off, c_noise_off, labels_off) = ours_F.calls[0], official_F.calls[0]
    torch.testing.assert_close(x_in, x_in_off, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_noise, c_noise_off, rtol=1e-5, atol=1e-6)
    assert (labels_ours is None and labels_off is None) or torch.equal(labels_ours, labels_off)


# =====================================================================================================================
# Losses (Table 1, rows p_train and λ(σ); training/loss.py)

def loss_net(x, sigma, labels=None, augment_labels=None):
    """A fixed denoiser for the losses: shrinkage plus terms that show σ, the labels and the augment labels."""
    D_x = x * 0.25 / (0.25 + sigma ** 2) + 0.1 * sigma
    if labels is not None: D_x = D_x + 0.01 * labels.argmax(1).reshape(-1, 1, 1, 1)
    if augment_labels is not None: D_x = D_x + 0.02 * augment_labels.reshape(-1, 1, 1, 1)
    return D_x


def flip_augment(images):
    """A toy augment pipe drawing from the global generator between the σ draw and the noise draw."""
    flip = (torch.rand([images.shape[0], 1, 1, 1]) < 0.5).to(images.dtype) * 2 - 1
    return images * flip, flip.reshape(-1, 1)


IMAGES = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(5))
LABELS = torch.eye(4)[[0, 1, 2, 3, 0, 1]]


def test_loss_weights_are_official():
    sigma = SIGMA
    torch.testing.assert_close(L.VPLoss().weight(sigma), 1 / sigma ** 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(L.VELoss().weight(sigma), 1 / sigma ** 2, rtol=1e-14, atol=0)
    for sigma_data in (0.5, 0.3):
        expected = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        torch.testing.assert_close(L.EDMLoss(sigma_data=sigma_data).weight(sigma), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize('augment_pipe', [None, flip_augment])
@pytest.mark.parametrize('ours,official,kwargs', [
    (L.EDMLoss, official_edm_loss, {}), (L.EDMLoss, official_edm_loss, dict(P_mean=-0.4, P_std=0.8, sigma_data=0.3)),
    (L.VELoss, official_ve_loss, {}), (L.VELoss, official_ve_loss, dict(sigma_min=0.05, sigma_max=20.0))])
def test_edm_and_ve_losses_draw_as_official(ours, official, kwargs, augment_pipe):
    """Same global seed → the same σ, augmentation, noise and per-element loss as the official __call__."""
    torch.manual_seed(11)
    got = ours(**kwargs)(loss_net, IMAGES, LABELS, augment_pipe=augment_pipe)
    torch.manual_seed(11)
    expected = official(loss_net, IMAGES, LABELS, augment_pipe=augment_pipe, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize('augment_pipe', [None, flip_augment])
@pytest.mark.parametrize('kwargs', [{}, dict(beta_d=10.0, beta_min=0.5, epsilon_t=1e-3)])
def test_vp_loss_formula_on_our_draw(kwargs, augment_pipe):
    """Our VPLoss draws t in float64 (the official code in float32: a different stream), so the official formula is
    replayed on a float64 draw from the same seed: same σ, weight, augmentation, noise and per-element loss."""
    torch.manual_seed(12)
    got = L.VPLoss(**kwargs)(loss_net, IMAGES, LABELS, augment_pipe=augment_pipe)
    torch.manual_seed(12)
    expected = official_vp_loss(loss_net, IMAGES, LABELS, augment_pipe=augment_pipe, uniform_dtype=F64, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_vp_loss_sigma_distribution_is_official():
    """Our σ ~ p_train of VP against the official float32 draw: two-sample Kolmogorov–Smirnov distance of ln σ."""
    n = 100_000
    torch.manual_seed(0)
    ours = L.VPLoss().sample_sigma((n, 1)).to(F64).log().flatten().sort().values
    torch.manual_seed(1)
    official = official_vp_sigma_of_t(1 + torch.rand(n) * (1e-5 - 1)).to(F64).log().sort().values
    grid = torch.cat([ours, official]).sort().values
    ks = (torch.searchsorted(ours, grid, right=True) - torch.searchsorted(official, grid, right=True)).abs().max() / n
    assert ks < 1.95 * math.sqrt(2 / n)  # the 0.1 % critical value
    assert ours[0] >= math.log(official_vp_sigma_of_t(torch.tensor(1e-5, dtype=F64))) - 1e-7  # t >= ε_t


# =====================================================================================================================
# Noise source and samplers (generate.py)

def test_stacked_random_generator_is_official():
    ours, official = stochastic.StackedRandomGenerator('cpu', SEEDS), OfficialStackedRandomGenerator('cpu', SEEDS)
    assert torch.equal(ours.randn([3, 2, 5], dtype=F64), official.randn([3, 2, 5], dtype=F64))
    x = torch.empty(3, 4, dtype=torch.float32)
    assert torch.equal(ours.randn_like(x), official.randn_like(x))
    assert torch.equal(ours.randint(0, 10, size=[3, 6]), official.randint(0, 10, size=[3, 6]))
    # On the CPU, torch seeds its Mersenne twister from the low 32 bits only, so the streams above cannot tell whether
    # seed % 2**32 was taken (CUDA's Philox uses all 64 bits); the seed each generator holds can.
    seeds = SEEDS + [-5]
    ours, official = stochastic.StackedRandomGenerator('cpu', seeds), OfficialStackedRandomGenerator('cpu', seeds)
    assert [g.initial_seed() for g in ours.generators] == [g.initial_seed() for g in official.generators] \
        == [3, 7, 12_345_678_901 % 2 ** 32, 2 ** 32 - 5]


EDM_CASES = [('gauss', dict(num_steps=4)), ('gauss', {}), ('gauss', dict(num_steps=2, rho=3, sigma_min=0.01,
                                                                         sigma_max=40)),
             ('gauss', dict(num_steps=6, S_churn=40, S_min=0.05, S_max=50, S_noise=1.007)),
             ('gauss', dict(num_steps=5, S_churn=1000)),  # γ capped at √2 − 1
             ('range', dict(num_steps=5, S_churn=10)), ('iddpm-grid', dict(num_steps=6, S_churn=30, S_min=0.1)),
             ('mixture', dict(num_steps=7, S_churn=20, S_noise=1.003))]


@pytest.mark.parametrize('net_name,kwargs', EDM_CASES)
def test_edm_sampler_is_official(net_name, kwargs):
    assert_same_samples(*run_both(stochastic.edm_sampler, official_edm_sampler, net_name, **kwargs))


ABLATION_GRID = [dict(solver=a, discretization=b, schedule=c, scaling=d, num_steps=5) for a in ['euler', 'heun']
                 for b in ['vp', 've', 'iddpm', 'edm'] for c in ['vp', 've', 'linear'] for d in ['vp', 'none']]
ABLATION_EXTRA = [('gauss', dict(alpha=0.5, discretization='ve', schedule='ve')),
                  ('gauss', dict(alpha=0.8, discretization='vp', schedule='vp', scaling='vp')),
                  ('gauss', dict(discretization='vp', schedule='vp', scaling='vp', epsilon_s=1e-2)),
                  ('gauss', dict(discretization='vp', epsilon_s=2e-3, sigma_min=0.02, sigma_max=100)),
                  ('gauss', dict(discretization='iddpm', C_1=0.002, C_2=0.01, M=500, num_steps=6)),
                  ('gauss', dict(discretization='iddpm', num_steps=2)),
                  ('gauss', dict(discretization='edm', rho=3, sigma_min=0.01, sigma_max=40, num_steps=7)),
                  ('gauss', dict(num_steps=18)),
                  ('range', dict(discretization='vp', schedule='vp', scaling='vp', num_steps=6)),
                  ('range', dict(discretization='ve', schedule='ve', solver='euler', num_steps=6)),
                  ('iddpm-grid', dict(discretization='iddpm', schedule='linear', num_steps=6)),
                  ('iddpm-grid', dict(discretization='edm', schedule='vp', scaling='vp', num_steps=6)),
                  ('mixture', dict(num_steps=8)), ('mixture', dict(discretization='vp', schedule='vp', scaling='vp'))]
DETERMINISTIC_CASES = [('gauss', k) for k in ABLATION_GRID] + ABLATION_EXTRA
STOCHASTIC_CASES = [('gauss', dict(k, S_churn=20, S_min=0.05, S_max=30, S_noise=1.007)) for k in ABLATION_GRID] + \
    [(net, dict(k, S_churn=15, S_noise=1.003)) for net, k in ABLATION_EXTRA] + \
    [('gauss', dict(S_churn=1000, num_steps=6)), ('iddpm-grid', dict(S_churn=40, discretization='iddpm', num_steps=6))]
case_id = lambda case: case[0] + '-' + '-'.join(f'{k}={v}' for k, v in case[1].items())


@pytest.mark.parametrize('net_name,kwargs', DETERMINISTIC_CASES, ids=map(case_id, DETERMINISTIC_CASES))
def test_deterministic_ablation_sampler_is_official(net_name, kwargs):
    assert_same_samples(*run_both(samplers.ablation_sampler, official_ablation_sampler, net_name, **kwargs))


@pytest.mark.parametrize('net_name,kwargs', DETERMINISTIC_CASES + STOCHASTIC_CASES,
                         ids=map(case_id, DETERMINISTIC_CASES + STOCHASTIC_CASES))
def test_stochastic_ablation_sampler_is_official(net_name, kwargs):
    assert_same_samples(*run_both(stochastic.ablation_sampler, official_ablation_sampler, net_name, **kwargs))
