"""edm_lit.augment (chapter 8): the non-leaky geometric augmentation pipeline, checked against exact transforms."""
import math

import numpy as np
import pytest
import torch

from edm_lit.augment import SYM6, AugmentPipe, rotate2d, scale2d, transform_images, translate2d, translate_int

ONLY = dict(xflip=0, yflip=0, rotate_int=0, translate_int=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
EDM_LABELS = ['xflip', 'yflip', 'scale', 'rotate_frac_cos', 'rotate_frac_sin', 'aniso_cos', 'aniso_sin',
              'translate_frac_x', 'translate_frac_y']  # NVlabs/edm train.py: xflip, yflip, scale, rotate_frac, aniso, translate_frac


def only(op, p=1.0, **kwargs):
    """A pipe with just one operation enabled."""
    return AugmentPipe(p=p, **{**ONLY, op: 1, **kwargs})


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_edms_nine_labels():
    pipe = AugmentPipe()
    assert pipe.p == 0.12 and pipe.label_names == EDM_LABELS and pipe.label_dim == 9
    assert only('rotate_int').label_dim == 2 and only('translate_int').label_dim == 2 and only('scale').label_dim == 1
    assert AugmentPipe(**ONLY).label_dim == 0


@pytest.mark.parametrize('shape', [(5, 3, 32, 32), (3, 1, 8, 12), (1, 2, 16, 16)])
def test_p_zero_is_the_identity_with_zero_labels(shape):
    x = images(*shape)
    y, a = AugmentPipe(p=0)(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, x) and torch.equal(a, torch.zeros(shape[0], 9)) and a.dtype == torch.float32


def test_without_operations_labels_are_empty():
    x = images(3, 1, 8, 8)
    y, a = AugmentPipe(p=1, **ONLY)(x)
    assert torch.equal(y, x) and a.shape == (3, 0)


@pytest.mark.parametrize('p', [-0.1, 1.5, float('nan'), '0.5'])
def test_bad_probability_raises(p):
    with pytest.raises(ValueError, match='probability p'):
        AugmentPipe(p=p)


@pytest.mark.parametrize('kwargs, match', [(dict(scale=-1), 'scale'), (dict(xflip=float('inf')), 'xflip'),
                                           (dict(aniso_rotate_prob=1.5), 'aniso_rotate_prob'),
                                           (dict(scale_std=None), 'scale_std')])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentPipe(**kwargs)


def test_bad_images_raise():
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        AugmentPipe()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='square'):
        only('rotate_int')(torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match='2 x 2'):
        translate_int(torch.zeros(1, 1, 1, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_flips_are_exact_and_labelled():
    x = images(300, 2, 6, 10)
    y, a = AugmentPipe(p=1, **{**ONLY, 'xflip': 1, 'yflip': 1})(x, generator=torch.Generator().manual_seed(0))
    expected = torch.where(a[:, 0, None, None, None] == 1, x.flip(3), x)
    expected = torch.where(a[:, 1, None, None, None] == 1, expected.flip(2), expected)
    assert torch.equal(y, expected)
    assert 0.4 < a[:, 0].mean().item() < 0.6 and 0.4 < a[:, 1].mean().item() < 0.6  # each flip: probability 1/2


def test_operation_probabilities():
    torch.manual_seed(0)
    n = 20000
    _, a = AugmentPipe()(torch.zeros(n, 1, 4, 4))
    p = 0.12
    std = lambda q: math.sqrt(q * (1 - q) / n)
    for column, q in ((0, 0.5), (1, p / 2), (2, p), (3, p), (5, p), (7, p)):  # xflip saturated: 1e8 * p >= 1
        frac = (a[:, column] != 0).float().mean().item()
        assert abs(frac - q) < 5 * std(q), (EDM_LABELS[column], frac, q)
    clean = (a == 0).all(1).float().mean().item()
    expected = 0.5 * (1 - p / 2) * (1 - p) ** 4
    assert abs(clean - expected) < 5 * std(expected)


def test_quarter_turns_match_rot90():
    x = images(200, 1, 7, 7)
    y, a = only('rotate_int')(x, generator=torch.Generator().manual_seed(0))
    k = (a[:, 0] + a[:, 1] + 2 * a[:, 1] * (1 - a[:, 0])).long()  # labels (0,0),(1,0),(1,1),(0,1) -> 0..3
    assert set(k.tolist()) == {0, 1, 2, 3}
    for turns in range(4):
        assert torch.equal(y[k == turns], torch.rot90(x[k == turns], turns, dims=(2, 3)))


def test_integer_translation_is_a_reflect_padded_crop():
    x = images(200, 3, 16, 10)
    pipe = only('translate_int')
    y, a = pipe(x, generator=torch.Generator().manual_seed(0))
    tx = (a[:, 0] * 10 * pipe.translate_int_max).round().long()
    ty = (a[:, 1] * 16 * pipe.translate_int_max).round().long()
    assert torch.allclose(a[:, 0] * 10 * pipe.translate_int_max, tx.float(), atol=1e-6)  # labels hold whole pixels
    P = 2
    padded = torch.nn.functional.pad(x, (P, P, P, P), mode='reflect')
    for i in range(len(x)):
        assert torch.equal(y[i], padded[i, :, P + ty[i]:P + ty[i] + 16, P - tx[i]:P - tx[i] + 10])
    assert (tx != 0).any() and (ty != 0).any()


def test_translate_int_reflects_without_repeating_the_edge():
    row = torch.arange(5.0).reshape(1, 1, 1, 5).expand(1, 1, 2, 5)
    shifted = translate_int(row, torch.tensor([2]), torch.tensor([0]))
    assert shifted[0, 0, 0].tolist() == [2, 1, 0, 1, 2]
    shifted = translate_int(row, torch.tensor([-3]), torch.tensor([0]))
    assert shifted[0, 0, 0].tolist() == [3, 4, 3, 2, 1]


def test_sym6_is_orthonormal():
    h = np.array(SYM6)
    assert abs(h.sum() - math.sqrt(2)) < 1e-12
    for n in range(len(h) // 2):
        assert abs(np.dot(h[:len(h) - 2 * n], h[2 * n:]) - (n == 0)) < 1e-9


def test_identity_warp_returns_the_image():
    x = images(3, 2, 20, 12)
    assert (transform_images(x, torch.eye(3).expand(3, 3, 3)) - x).abs().max() < 1e-5


def test_warp_by_whole_pixels_is_exact_even_for_noise():
    """out(p) = in(G_inv p): G_inv = T(-3, 2) moves the content 3 px right and 2 px up, sample for sample."""
    x = images(2, 1, 16, 16)
    shifted = transform_images(x, translate2d(torch.tensor([-3.0, -3.0]), torch.tensor([2.0, 2.0])))
    assert (shifted[..., :-2, 3:] - x[..., 2:, :-3]).abs().max() < 1e-4


def test_matrices():
    t = torch.tensor([0.3, -1.0])
    R = rotate2d(t)
    assert R.shape == (2, 3, 3)
    assert torch.allclose(R @ rotate2d(-t), torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(R[:, :2, :2].det(), torch.ones(2))
    assert torch.equal(scale2d(t, 2 * t)[:, [0, 1], [0, 1]], torch.stack([t, 2 * t], 1))
    assert torch.equal(translate2d(t, -t)[:, :2, 2], torch.stack([t, -t], 1))


H = W = 32
_cy, _cx = (H - 1) / 2, (W - 1) / 2
_yy, _xx = torch.meshgrid(torch.arange(H, dtype=torch.float64) - _cy, torch.arange(W, dtype=torch.float64) - _cx,
                          indexing='ij')
PIXELS = torch.stack([_xx.flatten(), _yy.flatten(), torch.ones(H * W, dtype=torch.float64)])
MU, WIDTH = (4.0, -3.0), 2.0


def blob_at(q):
    return torch.exp(-((q[:, 0] - MU[0]) ** 2 + (q[:, 1] - MU[1]) ** 2) / (2 * WIDTH ** 2)).reshape(-1, H, W)


def max_blob_error(y, G_inv):
    q = G_inv @ PIXELS
    inside = ((q[:, 0].abs() < _cx - 2) & (q[:, 1].abs() < _cy - 2)).reshape(-1, H, W)
    return ((y[:, 0].double() - blob_at(q)).abs() * inside).flatten(1).amax(1)


BLOB = blob_at(PIXELS[None]).float()[:, None].expand(128, 1, H, W)


@pytest.mark.parametrize('op, decode', [
    ('scale', lambda a, pipe: scale2d(*(2 * [(-pipe.scale_std * a[:, 0]).exp2()]))),
    ('rotate_frac', lambda a, pipe: rotate2d(torch.atan2(a[:, 1], 1 + a[:, 0]))),
    ('translate_frac', lambda a, pipe: translate2d(-a[:, 0] * pipe.translate_frac_std * W,
                                                   -a[:, 1] * pipe.translate_frac_std * H)),
    ('aniso', lambda a, pipe: scale2d((-pipe.aniso_std * a[:, 0]).exp2(), (pipe.aniso_std * a[:, 0]).exp2())),
])
def test_labels_decode_to_the_applied_transform(op, decode):
    pipe = only(op, aniso_rotate_prob=0)  # axis-aligned anisotropy: r = 0, so a = (w, 0)
    y, a = pipe(BLOB, generator=torch.Generator().manual_seed(0))
    assert (a != 0).any(1).all()
    assert max_blob_error(y, decode(a.double(), pipe)).max() < 0.04


def test_anisotropy_label_is_ambiguous_but_zero_means_identity():
    """(w, r) and (-w, r + pi) give the same label and different transforms; a = 0 only for w = 0."""
    w, r = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    G = lambda w, r: rotate2d(-r) @ scale2d((-0.2 * w).exp2(), (0.2 * w).exp2()) @ rotate2d(r)
    label = lambda w, r: torch.stack([w * r.cos(), w * r.sin()])
    assert torch.allclose(label(w, r), label(-w, r + math.pi))
    assert not torch.allclose(G(w, r), G(-w, r + math.pi), atol=0.1)
    pipe = only('aniso')
    y, a = pipe(BLOB, generator=torch.Generator().manual_seed(0))
    errors = []
    for sign in (1, -1):
        w_a = sign * torch.hypot(a[:, 0], a[:, 1]).double()
        r_a = torch.atan2(sign * a[:, 1], sign * a[:, 0]).double()
        errors.append(max_blob_error(y, G(w_a, r_a)))
    assert torch.minimum(*errors).max() < 0.04  # every image is one of the two candidates
    assert (errors[0] > 0.1).any() and (errors[1] > 0.1).any()  # and both candidates are needed


def test_zero_labels_mean_untouched_images():
    """The non-leaky invariant: an image whose labels are all zero reaches the network exactly as it was."""
    x = images(400, 3, 16, 16)
    torch.manual_seed(0)
    y, a = AugmentPipe(p=0.3)(x)
    clean = (a == 0).all(1)
    assert clean.any() and (~clean).any()
    assert torch.equal(y[clean], x[clean])
    assert y[~clean].ne(x[~clean]).flatten(1).any(1).all()


def test_draws_follow_the_generator():
    x = images(8, 3, 16, 16)
    run = lambda seed: AugmentPipe(p=0.5)(x, generator=torch.Generator().manual_seed(seed))
    (y1, a1), (y2, a2), (y3, a3) = run(5), run(5), run(6)
    assert torch.equal(y1, y2) and torch.equal(a1, a2) and not torch.equal(a1, a3)
    torch.manual_seed(5)
    g1 = AugmentPipe(p=0.5)(x)
    torch.manual_seed(5)
    g2 = AugmentPipe(p=0.5)(x)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])  # no generator: the global one, as the official


def test_dtype_and_shape_follow_the_images():
    x = images(4, 1, 12, 12).double()
    y, a = AugmentPipe(p=1)(x, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float64 and y.shape == x.shape and a.dtype == torch.float32 and a.shape == (4, 9)


def test_labels_feed_the_network_and_none_means_zero():
    from edm_lit.networks import make_network
    torch.manual_seed(0)
    net = make_network('ddpmpp-small', model_channels=16, num_blocks=1, augment_dim=AugmentPipe().label_dim).eval()
    x = images(2, 3, 16, 16)
    y, a = AugmentPipe(p=1)(x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert net(y, torch.zeros(2), augment_labels=a).shape == x.shape
        assert torch.equal(net(x, torch.zeros(2)), net(x, torch.zeros(2), augment_labels=torch.zeros(2, 9)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_runs_on_the_images_device():
    x = images(64, 3, 32, 32).cuda()
    y, a = AugmentPipe(p=0.5)(x, generator=torch.Generator(device='cuda').manual_seed(0))
    assert y.device.type == a.device.type == 'cuda' and a.shape == (64, 9)
    clean = (a == 0).all(1)
    assert torch.equal(y[clean], x[clean])
    assert (transform_images(x, torch.eye(3, device='cuda').expand(64, 3, 3)) - x).abs().max() < 1e-5
    y, a = AugmentPipe(p=1, **{**ONLY, 'xflip': 1})(x)
    assert torch.equal(y, torch.where(a[:, 0, None, None, None] == 1, x.flip(3), x))
