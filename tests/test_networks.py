"""edm_lit.networks (chapter 7): the DDPM++ / NCSN++ and ADM U-Nets, checked against exact counts, closed forms and
identities."""
import json
import math

import numpy as np
import pytest
import torch

from edm_lit.networks import (PRESET_CLASSES, PRESETS, Conv2d, DhariwalUNet, FourierEmbedding, GroupNorm, Linear,
                              PositionalEmbedding, SongUNet, UNetBlock, attention, make_network, resample_kernel,
                              weight_init)

OFFICIAL_PARAMS = [('ddpmpp-cifar10', 0, 55_733_891), ('ddpmpp-cifar10', 10, 55_735_299),
                   ('ncsnpp-cifar10', 0, 56_397_827)]  # NVlabs/edm training/networks.py, CIFAR-10 configurations
# NVlabs/edm 008a4e5, training/networks.py: DhariwalUNet(img_resolution=64, in_channels=3, out_channels=3,
# label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4]), other arguments default, counted on the meta device
ADM_IMAGENET64_PARAMS = 295_899_267
# The same code, DhariwalUNet(img_resolution=8, in_channels=3, out_channels=6, label_dim=10, model_channels=32,
# channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]): the network inside iDDPMPrecond of the shared fixture
# official-edm/iddpm_adm_cond.pkl (its .npz records n_params = 829,638)
ADM_TINY = dict(img_resolution=8, in_channels=3, out_channels=6, label_dim=10, model_channels=32, channel_mult=(1, 2),
                num_blocks=1, attn_resolutions=(4,))
ADM_TINY_PARAMS = 829_638


def count_params(net):
    return sum(p.numel() for p in net.parameters())


def perturbed(net, seed=0, scale=0.02):
    """The same network with every parameter moved a little, so that near-zero-initialized layers matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def tiny(**kwargs):
    """The small DDPM++ preset cut down further (16 channels, one block per level) for fast CPU tests."""
    return make_network('ddpmpp-small', **{'model_channels': 16, 'num_blocks': 1, **kwargs})


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return perturbed(tiny(label_dim=10, augment_dim=9)).eval()


@pytest.mark.parametrize('preset, label_dim, expected', OFFICIAL_PARAMS)
def test_parameter_counts_equal_the_official(preset, label_dim, expected):
    with torch.device('meta'):
        assert count_params(make_network(preset, label_dim=label_dim)) == expected


def test_module_names_follow_the_official_checkpoints():
    with torch.device('meta'):
        ddpmpp, ncsnpp = make_network('ddpmpp-cifar10'), make_network('ncsnpp-cifar10')
    keys = set(ddpmpp.state_dict())
    for key in ('map_layer0.weight', 'map_augment.weight', 'enc.32x32_conv.weight', 'enc.16x16_down.skip.weight',
                'enc.16x16_block0.qkv.weight', 'dec.8x8_in0.proj.weight', 'dec.32x32_aux_conv.weight'):
        assert key in keys, key
    assert 'map_augment.bias' not in keys and 'map_noise.freqs' not in keys
    assert 'enc.16x16_aux_residual.weight' in ncsnpp.state_dict() and 'map_noise.freqs' in ncsnpp.state_dict()
    assert isinstance(ncsnpp.map_noise, FourierEmbedding) and ncsnpp.map_noise.freqs.shape == (128,)


@pytest.mark.parametrize('mode', ['xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal'])
def test_weight_init_variance(mode):
    torch.manual_seed(0)
    fan_in, fan_out = 300, 700
    var = 2 / (fan_in + fan_out) if mode.startswith('xavier') else 1 / fan_in
    w = weight_init([600, 700], mode, fan_in, fan_out)
    assert abs(w.var().item() / var - 1) < 0.02
    assert abs(w.mean().item()) < 4 * math.sqrt(var / w.numel())
    if mode.endswith('uniform'): assert w.abs().max().item() <= math.sqrt(3 * var)


def test_weight_init_rejects_unknown_modes():
    with pytest.raises(ValueError, match='lecun'):
        weight_init([2, 2], 'lecun', 1, 1)
    with pytest.raises(ValueError, match='lecun'):
        Linear(2, 2, init_mode='lecun')


def test_box_filter_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 5, 8, 6, generator=torch.Generator().manual_seed(0))
    down, up = Conv2d(5, 5, kernel=0, down=True), Conv2d(5, 5, kernel=0, up=True)
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), atol=1e-6)
    assert len(list(down.parameters())) == 0


@pytest.mark.parametrize('f', [[1, 1], [1, 3, 3, 1], [1, 5, 10, 10, 5, 1]])
def test_resample_kernel_has_unit_dc_gain(f):
    K = resample_kernel(f)[0, 0].double()
    f = torch.tensor(f, dtype=torch.float64)
    assert torch.allclose(K, torch.outer(f, f) / f.sum() ** 2) and abs(K.sum().item() - 1) < 1e-7
    ones = torch.ones(1, 1, 12, 12)
    for up in (False, True):  # a constant image stays constant away from the border
        y = Conv2d(1, 1, kernel=0, up=up, down=not up, resample_filter=f.tolist())(ones)
        assert y.shape[-1] == (24 if up else 6)
        assert torch.allclose(y[..., 3:-3, 3:-3], torch.ones(()), atol=1e-6)


def test_conv2d_resampling_with_kernel_halves_or_doubles_the_size():
    x = torch.randn(1, 4, 16, 16)
    assert Conv2d(4, 8, kernel=3, down=True)(x).shape == (1, 8, 8, 8)
    assert Conv2d(4, 8, kernel=3, down=True, fused_resample=True, resample_filter=[1, 3, 3, 1])(x).shape == (1, 8, 8, 8)
    assert Conv2d(4, 8, kernel=3, up=True, resample_filter=[1, 3, 3, 1])(x).shape == (1, 8, 32, 32)
    assert Conv2d(4, 8, kernel=1)(x).shape == (1, 8, 16, 16)


def test_conv2d_and_filters_reject_bad_arguments():
    with pytest.raises(ValueError, match='down=True'):
        Conv2d(1, 1, kernel=3, up=True, down=True)
    with pytest.raises(ValueError, match='resample_filter'):
        resample_kernel([1, -1])
    with pytest.raises(ValueError, match='resample_filter'):
        resample_kernel([])
    with pytest.raises(ValueError, match='even length'):
        resample_kernel([1, 2, 1])  # an odd filter cannot resample by exactly 2


def test_conv2d_zero_padding_keeps_the_size_and_is_a_correlation():
    conv = Conv2d(1, 1, kernel=3, bias=False)
    with torch.no_grad(): conv.weight.zero_(); conv.weight[0, 0, 1, 2] = 1  # picks the right neighbour
    x = torch.arange(20.).reshape(1, 1, 4, 5)
    expected = torch.nn.functional.pad(x[..., 1:], (0, 1))
    assert torch.equal(conv(x), expected)


def test_group_norm_standardizes_each_group_of_each_sample():
    g = torch.Generator().manual_seed(0)
    x = 5 - 3 * torch.randn(3, 96, 4, 4, generator=g)
    gn = GroupNorm(96)
    assert gn.num_groups == 24  # min(32, 96 // 4)
    z = gn(x).reshape(3, 24, -1)
    assert torch.allclose(z.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert torch.allclose(gn(x)[:1], gn(x[:1]), atol=1e-6)  # per sample: no batch statistics
    with pytest.raises(ValueError, match='num_channels=3'):
        GroupNorm(3)


def test_attention_equals_the_softmax_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 8, 20, dtype=torch.float64, generator=g).unbind(0)
    w = torch.softmax(torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(8), dim=-1)
    assert torch.allclose(attention(q, k, v), torch.einsum('nhqk,nhck->nhcq', w, v), atol=1e-12)
    uniform = attention(q, torch.zeros_like(k), v)  # equal keys: every query averages the values
    assert torch.allclose(uniform, v.mean(-1, keepdim=True).expand_as(v), atol=1e-12)


def test_positional_embedding_closed_form():
    t = torch.tensor([-2.0, 0.0, 0.5, 999.0], dtype=torch.float64)
    for endpoint, denom in ((True, 7), (False, 8)):
        e = PositionalEmbedding(16, endpoint=endpoint)(t).numpy()
        omega = 10000.0 ** (-np.arange(8) / denom)
        tol = 1e-7 * np.abs(t.numpy())[:, None] + 1e-12  # the layer's frequencies are float32 (relative error 6e-8)
        assert np.all(np.abs(e[:, :8] - np.cos(np.outer(t, omega))) <= tol)
        assert np.all(np.abs(e[:, 8:] - np.sin(np.outer(t, omega))) <= tol)


def test_embeddings_have_a_stationary_kernel():
    t = torch.linspace(-2, 2, 9, dtype=torch.float64)
    torch.manual_seed(0)
    fourier = FourierEmbedding(64)
    omega_f = (2 * math.pi * fourier.freqs).double().numpy()
    omega_p = 10000.0 ** (-np.arange(32) / 31)
    for emb, omega, tol in ((PositionalEmbedding(64, endpoint=True), omega_p, 1e-4), (fourier, omega_f, 1e-9)):
        e = emb(t).numpy()
        kernel = np.cos(np.subtract.outer(t.numpy(), t.numpy())[..., None] * omega).sum(-1)
        assert np.allclose(e @ e.T, kernel, rtol=0, atol=tol)
        assert np.allclose(np.diag(e @ e.T), 32, rtol=0, atol=1e-9)


def test_fourier_frequencies_are_a_fixed_gaussian_buffer():
    torch.manual_seed(0)
    emb = FourierEmbedding(8192, scale=16)
    assert list(emb.parameters()) == [] and emb.freqs.shape == (4096,)
    assert abs(emb.freqs.std().item() / 16 - 1) < 0.05
    with pytest.raises(ValueError, match='even'):
        FourierEmbedding(7)
    with pytest.raises(ValueError, match='even'):
        PositionalEmbedding(9)


def test_unet_block_shapes_and_skip_scale():
    block = UNetBlock(8, 16, emb_channels=12, down=True, attention=True, skip_scale=math.sqrt(0.5))
    y = block(torch.randn(2, 8, 8, 8), torch.randn(2, 12))
    assert y.shape == (2, 16, 4, 4) and block.num_heads == 1
    up = UNetBlock(8, 8, emb_channels=12, up=True)
    assert up(torch.randn(2, 8, 8, 8), torch.randn(2, 12)).shape == (2, 8, 16, 16)
    same = UNetBlock(8, 8, emb_channels=12)
    assert same.skip is None  # identity skip when nothing changes


def test_unet_block_with_silent_residual_is_its_skip_path_scaled():
    """With conv1 = 0 and no attention the block is skip(x) * skip_scale exactly (Eq. arch-block)."""
    block = UNetBlock(8, 8, emb_channels=4, skip_scale=math.sqrt(0.5))
    with torch.no_grad(): block.conv1.weight.zero_()
    x = torch.randn(3, 8, 4, 4)
    assert torch.allclose(block(x, torch.randn(3, 4)), x * math.sqrt(0.5), atol=1e-6)


def test_songunet_init_follows_the_official_scheme():
    torch.manual_seed(0)
    net = make_network('ddpmpp-small')
    for name, p in net.named_parameters():
        if name.endswith('bias'): assert torch.equal(p, torch.zeros_like(p)), name
    for name, m in net.named_modules():
        if not isinstance(m, (Conv2d, Linear)) or m.weight is None: continue
        fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
        a = math.sqrt(6 / (fan_in + fan_out))  # xavier_uniform bound, Eq. arch-xavier
        scale = 1e-5 if name.endswith(('conv1', 'proj', 'aux_conv')) else math.sqrt(0.2) if name.endswith('qkv') else 1
        assert m.weight.abs().max().item() <= scale * a * (1 + 1e-6), name
        assert m.weight.abs().max().item() >= 0.5 * scale * a, name  # and really drawn at that scale


def test_fresh_network_output_is_tiny_but_not_zero():
    torch.manual_seed(0)
    net = tiny().eval()
    feats = []
    hook = net.dec['32x32_aux_norm'].register_forward_hook(lambda m, i, o: feats.append(torch.nn.functional.silu(o)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): F_x = net(x, torch.tensor([0.3, -1.0]))
    hook.remove()
    W = net.dec['32x32_aux_conv'].weight
    bound = W.abs().sum(dim=(1, 2, 3)).max().item() * feats[0].abs().max().item()  # |sum w h| <= sum |w| max |h|
    assert 0 < F_x.abs().max().item() <= bound
    assert bound < 1e-3


def test_output_shape_equals_input_shape(small):
    for side in (8, 24):
        with torch.no_grad():
            assert small(torch.randn(2, 3, side, side), torch.zeros(2)).shape == (2, 3, side, side)
    net = tiny(img_resolution=16, attn_resolutions=(8,)).eval()
    with torch.no_grad(): assert net(torch.randn(1, 3, 16, 16), torch.zeros(1)).shape == (1, 3, 16, 16)
    ncsn = make_network('ncsnpp-cifar10', model_channels=16, num_blocks=1, channel_mult=(1, 2), augment_dim=0)
    with torch.no_grad(): assert ncsn(torch.randn(2, 3, 16, 16), torch.zeros(2)).shape == (2, 3, 16, 16)


def test_batch_independence_in_eval_mode(small):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, generator=g)
    y = torch.eye(10)[[0, 4, 9]]
    a = torch.randn(3, 9, generator=g)
    with torch.no_grad():
        batch = small(x, t, y, a)
        alone = torch.cat([small(x[i:i + 1], t[i:i + 1], y[i:i + 1], a[i:i + 1]) for i in range(3)])
        x2 = x.clone()
        x2[1:] = -x2[1:]
        other = small(x2, t, y, a)
    assert torch.allclose(batch, alone, atol=1e-5)
    assert torch.allclose(batch[0], other[0], atol=1e-5) and not torch.allclose(batch[1], other[1], atol=1e-3)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = perturbed(make_network('ncsnpp-cifar10', model_channels=16, num_blocks=1, channel_mult=(1, 2))).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    with torch.no_grad():
        ref = net(x, t)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(ref, out, atol=1e-5)


def test_missing_labels_mean_zero_labels(small):
    """Sampling passes augment_labels=None: exactly the network with a = 0 (map_augment has no bias)."""
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    with torch.no_grad():
        assert torch.equal(small(x, t, None, None), small(x, t, torch.zeros(2, 10), torch.zeros(2, 9)))
        assert torch.allclose(small(x, t[:1]), small(x, t[:1].expand(2)), atol=1e-6)  # one label broadcasts
        assert not torch.allclose(small(x, t, torch.eye(10)[:2]), small(x, t), atol=1e-4)  # labels matter
        assert not torch.allclose(small(x, t, None, torch.ones(2, 9)), small(x, t), atol=1e-4)


def test_label_dropout_zeroes_class_labels_in_training():
    torch.manual_seed(0)
    net = perturbed(tiny(label_dim=10, label_dropout=1.0)).train()  # dropout=0 in preset
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.eye(10)[:2]), net(x, t, torch.zeros(2, 10)))
        net.eval()
        assert not torch.allclose(net(x, t, torch.eye(10)[:2]), net(x, t, torch.zeros(2, 10)), atol=1e-4)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    net = perturbed(tiny(dropout=0.5))
    x, t = torch.randn(1, 3, 16, 16), torch.zeros(1)
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x, t), net(x, t))
        net.eval()
        assert torch.equal(net(x, t), net(x, t))


def test_gradients_reach_every_parameter(small):
    net = tiny(label_dim=10, augment_dim=9)
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(10)[:2], torch.randn(2, 9))
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_float64_input_follows_its_dtype(small):
    x, t = torch.randn(1, 3, 16, 16), torch.randn(1)
    with torch.no_grad():
        y64 = small(x.double(), t.double())
        assert y64.dtype == torch.float64
        assert torch.allclose(y64.float(), small(x, t), atol=1e-4)


def test_config_round_trips_through_json():
    torch.manual_seed(0)
    net = make_network('ncsnpp-cifar10', model_channels=16, num_blocks=1, channel_mult=(1, 2), label_dim=3)
    rebuilt = SongUNet(**json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())
    assert count_params(rebuilt) == count_params(net)
    assert rebuilt.config['label_dim'] == 3 and rebuilt.config['resample_filter'] == [1, 3, 3, 1]


def test_same_seed_same_weights():
    torch.manual_seed(7)
    a = tiny()
    torch.manual_seed(7)
    b = tiny()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize('bad, match', [
    (lambda n: n(torch.randn(1, 3, 30, 30), torch.zeros(1)), 'divisible by 4'),
    (lambda n: n(torch.randn(2, 1, 16, 16), torch.zeros(2)), r'\(N, 3, H, W\)'),
    (lambda n: n(torch.randn(3, 16, 16), torch.zeros(3)), r'\(N, 3, H, W\)'),
    (lambda n: n(torch.randn(2, 3, 16, 16), torch.zeros(3)), 'noise_labels'),
    (lambda n: n(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.zeros(2, 7)), 'class_labels'),
    (lambda n: n(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.zeros(10)), 'class_labels'),
    (lambda n: n(torch.randn(2, 3, 16, 16), torch.zeros(2), None, torch.zeros(2, 6)), 'augment_labels'),
])
def test_bad_inputs_raise(small, bad, match):
    with pytest.raises(ValueError, match=match):
        bad(small)


def test_labels_given_to_a_network_without_them_raise():
    net = tiny()
    with pytest.raises(ValueError, match='label_dim=0'):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, 10))
    with pytest.raises(ValueError, match='augment_dim=0'):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), None, torch.zeros(1, 9))


@pytest.mark.parametrize('kwargs, match', [
    (dict(embedding_type='learned'), 'embedding_type'), (dict(encoder_type='skip'), 'encoder_type'),
    (dict(decoder_type='skip'), 'decoder_type'), (dict(img_resolution=30), 'img_resolution=30'),
    (dict(dropout=1.0), 'dropout=1.0'), (dict(label_dropout=-0.1), 'label_dropout=-0.1'),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_network('ddpmpp-small', **kwargs)


def test_presets():
    assert set(PRESETS) >= {'ddpmpp-cifar10', 'ncsnpp-cifar10', 'adm-imagenet64', 'ddpmpp-small',
                            'ddpmpp-fashion-mnist'}
    assert set(PRESET_CLASSES) <= set(PRESETS)
    with torch.device('meta'):
        assert 1_000_000 <= count_params(make_network('ddpmpp-small')) <= 2_000_000
        fm = make_network('ddpmpp-fashion-mnist')
    assert fm.in_channels == fm.out_channels == 1 and fm.img_resolution == 32 and fm.augment_dim == 9
    with pytest.raises(ValueError, match='ddpmpp-tiny'):
        make_network('ddpmpp-tiny')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu(small):
    x, t, y, a = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(10)[:2], torch.randn(2, 9)
    with torch.no_grad():
        ref = small(x, t, y, a)
        gpu = small.cuda()(x.cuda(), t.cuda(), y.cuda(), a.cuda()).cpu()
        small.cpu()
    assert torch.allclose(ref, gpu, atol=1e-3)


# ADM (DhariwalUNet), the ImageNet-64 network

def test_adm_preset_parameter_count_equals_the_official():
    with torch.device('meta'):
        net = make_network('adm-imagenet64')
        tiny_adm = DhariwalUNet(**ADM_TINY)
    assert isinstance(net, DhariwalUNet) and count_params(net) == ADM_IMAGENET64_PARAMS
    assert count_params(tiny_adm) == ADM_TINY_PARAMS


def test_adm_state_dict_names_and_shapes_follow_the_official():
    with torch.device('meta'):
        sd = make_network('adm-imagenet64').state_dict()
    official = {  # read off the official DhariwalUNet of the adm-imagenet64 settings (NVlabs/edm 008a4e5)
        'map_layer0.weight': (768, 192), 'map_layer1.bias': (768,), 'map_label.weight': (768, 1000),
        'enc.64x64_conv.weight': (192, 3, 3, 3), 'enc.32x32_down.affine.weight': (384, 768),
        'enc.32x32_down.skip.resample_filter': (1, 1, 2, 2), 'enc.32x32_block0.qkv.weight': (1152, 384, 1, 1),
        'enc.16x16_block0.skip.weight': (576, 384, 1, 1), 'dec.8x8_in0.qkv.weight': (2304, 768, 1, 1),
        'dec.8x8_in1.conv1.weight': (768, 768, 3, 3), 'dec.64x64_block0.conv0.weight': (192, 576, 3, 3),
        'dec.64x64_block3.skip.weight': (192, 384, 1, 1), 'out_norm.weight': (192,), 'out_conv.weight': (3, 192, 3, 3),
    }
    for name, shape in official.items():
        assert name in sd and tuple(sd[name].shape) == shape, name
    absent = ('map_label.bias', 'map_augment.weight', 'enc.32x32_down.skip.weight', 'dec.16x16_up.skip.weight',
              'dec.64x64_block3.qkv.weight', 'map_noise.freqs')
    assert not any(name in sd for name in absent)
    assert len(sd) == 553  # parameters and resample-filter buffers of the official network


def adm_tiny(**kwargs):
    torch.manual_seed(0)
    return DhariwalUNet(**{**ADM_TINY, 'out_channels': 3, **kwargs})


def test_adm_forward_at_a_tiny_config():
    net = adm_tiny(augment_dim=9).eval()
    g = torch.Generator().manual_seed(0)
    x, t, a = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, generator=g), torch.randn(2, 9, generator=g)
    y = torch.eye(10)[[2, 5]]
    with torch.no_grad():
        assert torch.equal(net(x, t, y, a), torch.zeros_like(x))  # every branch end starts at exactly zero
        perturbed(net)
        out = net(x, t, y, a)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, net(x, t, torch.eye(10)[[7, 0]], a), atol=1e-4)  # class labels matter
        assert torch.equal(net(x, t, None, a), net(x, t, torch.zeros(2, 10), a))  # None means no class
        assert torch.allclose(out[:1], net(x[:1], t[:1], y[:1], a[:1]), atol=1e-5)  # batch independence
    with pytest.raises(ValueError, match='class_labels'):
        net(x, t, torch.zeros(2, 7))


def test_adm_dropout_only_in_training():
    net = perturbed(adm_tiny(dropout=0.5))
    x, t, y = torch.randn(1, 3, 8, 8), torch.zeros(1), torch.eye(10)[:1]
    with torch.no_grad():
        assert not torch.allclose(net.train()(x, t, y), net(x, t, y))
        net.eval()
        assert torch.equal(net(x, t, y), net(x, t, y))


def test_adm_block_is_the_adaptive_group_norm_formula():
    """Eq. arch-adaptive: u <- SiLU(GN(u) (1 + s) + b), [s, b] = A e; identity skip, no 1/sqrt(2)."""
    torch.manual_seed(0)
    block = perturbed(UNetBlock(32, 32, emb_channels=16, adaptive_scale=True, resample_proj=False)).eval()
    h, e = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    with torch.no_grad():
        u = block.conv0(torch.nn.functional.silu(block.norm0(h)))
        s, b = block.affine(e)[:, :, None, None].chunk(2, dim=1)
        expected = h + block.conv1(torch.nn.functional.silu(block.norm1(u) * (1 + s) + b))
        assert torch.allclose(block(h, e), expected, atol=1e-5)


def test_adm_heads_and_resampling_skip():
    """One head per 64 channels (none below 64); a same-width resampling block's skip only resamples."""
    assert UNetBlock(256, 256, 8, attention=True, channels_per_head=64).num_heads == 4
    narrow = UNetBlock(32, 32, 8, attention=True, channels_per_head=64)
    assert narrow.num_heads == 0 and not hasattr(narrow, 'qkv')
    down = UNetBlock(8, 8, 4, down=True, resample_proj=False)
    assert down.skip.weight is None
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(down.skip(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    block = perturbed(UNetBlock(128, 128, 4, attention=True, channels_per_head=64)).eval()
    seen = []
    block.norm2.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    h, e = torch.randn(2, 128, 4, 4), torch.randn(2, 4)
    with torch.no_grad():
        out = block(h, e)
        x, y = seen[0]
        q, k, v = block.qkv(y).reshape(2, 2, 64, 3, 16).unbind(3)  # two heads of 64 channels, the official layout
        w = torch.softmax(torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(64), dim=-1)
        a = torch.einsum('nhqk,nhck->nhcq', w, v).reshape(2, 128, 4, 4)
        assert torch.allclose(out, x + block.proj(a), atol=1e-5)


def test_adm_config_round_trips_through_json():
    net = adm_tiny(label_dim=3)
    rebuilt = DhariwalUNet(**json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert rebuilt.config['channel_mult'] == [1, 2] and rebuilt.config['attn_resolutions'] == [4]
